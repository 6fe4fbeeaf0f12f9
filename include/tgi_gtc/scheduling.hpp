// tgi_gtc::scheduling: a lock-free scheduling engine for LLM serving loops.
//
// The umbrella header: include this one. Components:
//   scheduling/task.hpp        Priority, TaskId, ScheduledTask, SchedulerConfig, ScheduleError
//   scheduling/scheduler.hpp   Scheduler: the lock-free priority queue of waiting tasks
//   scheduling/block_pool.hpp  BlockPool, BlockAllocator: the KV-cache block pool and block tables
//   scheduling/engine.hpp      Engine: the serving-loop step (admission, preemption, resumption)
#pragma once

#include <tgi_gtc/scheduling/task.hpp>
#include <tgi_gtc/scheduling/scheduler.hpp>
#include <tgi_gtc/scheduling/block_pool.hpp>
#include <tgi_gtc/scheduling/engine.hpp>
