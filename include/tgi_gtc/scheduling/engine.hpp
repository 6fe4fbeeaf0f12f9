// Engine: the serving-loop engine. Producers on any thread submit and cancel
// tasks; one serving-loop thread calls step() once per model iteration and
// carries out the plan it returns. The engine owns the waiting queue (a
// Scheduler), the running and paused sets, and two BlockPools: device (GPU KV
// pages) and host (swap space). With preemption enabled, a higher-priority
// arrival pauses lower-priority preemptible work, whose KV blocks are swapped
// to the host pool (or released, to be recomputed), and the paused task
// resumes later, ahead of waiting tasks of its priority. (With priority
// scheduling off, every task has one level: arrivals never preempt, and only
// a running task that needs blocks to grow may pause others, newer ones
// first; docs/engine.md.)
//
// Threading contract
//   any thread          next_id, submit, cancel, scheduler, stats, config
//   serving loop only   step, append_tokens, finish, block_table
// The serving loop is the thread that calls step(); the loop-only calls must
// come from it (or be otherwise serialized with it). A cancel() made on the
// thread that last called step() counts as a loop call: a thread that hands
// the loop over calls cancel() again only after the new loop thread's first
// step() happens-before it (docs/engine.md). Producers never take a
// lock: submit and cancel are lock-free (see docs/engine.md, "Guarantees"),
// with two narrow waits: a cancel of the very task step() is taking out of
// the waiting queue at that moment waits for that take, and a submit waits
// while another submit of the same id is in flight. A cancel of a running or
// paused task made on another thread is carried out by the next step().
//
// Task lifecycle
//   submit -> waiting --step--> running --finish--> finished
//                                 |  ^
//                         step    |  |  step
//                      (preempt)  v  |  (resume)
//                                paused
//   cancel: waiting, running or paused -> cancelled (every block freed)
//
// Executing a plan: perform every preempted[i].swap_out copy (device to host)
// first, then every resumed[i].swap_in copy (host to device), then run the
// resumed and admitted tasks; finish all of it before the next step(). Device
// blocks freed by a preemption may be handed to an admission or resumption of
// the same step (that is how a preemption makes room), so the swap-out copies
// must read them first; host blocks freed by a resumption are returned to the
// host pool only at the end of the step, so no swap-out of the same step
// overwrites them before their swap-in reads them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <system_error>
#include <vector>

#include <tgi_gtc/scheduling/block_pool.hpp>
#include <tgi_gtc/scheduling/scheduler.hpp>
#include <tgi_gtc/scheduling/task.hpp>

namespace tgi_gtc::scheduling {

namespace detail {
class EngineCore;
}

struct EngineConfig {
  /// The waiting queue: its bound, priority or FIFO order, and whether a
  /// waiting task may preempt running ones (enable_preemption).
  SchedulerConfig scheduler{};
  /// Device KV blocks (GPU pages); at least 1.
  std::uint32_t device_blocks = 1024;
  /// Host swap blocks. 0: a preempted task's KV is released and recomputed on
  /// resume.
  std::uint32_t host_blocks = 0;
  /// Tokens per block; at least 1.
  std::uint32_t block_size = 16;
  /// Most tasks running at once; 1 .. 2^20.
  std::uint32_t max_running = 256;
  /// Prefill token budget of one step: the estimated_tokens of new admissions
  /// plus all tokens so far of recomputed resumptions. At least 1.
  std::size_t max_step_tokens = 8192;
};

/// One block copy between the device and host pools.
struct BlockCopy {
  BlockId from = 0;
  BlockId to = 0;
  friend bool operator==(const BlockCopy&, const BlockCopy&) = default;
};

/// A waiting task admitted by this step, with its device blocks in token order.
struct Admission {
  ScheduledTask task;
  std::vector<BlockId> blocks;
};

/// A running task paused by this step. swap_out lists the device-to-host
/// copies that save its KV; it is empty with recompute == true when the KV
/// was released instead (no host room) and will be recomputed on resume.
struct Preemption {
  ScheduledTask task;
  std::vector<BlockCopy> swap_out;
  bool recompute = false;
};

/// A paused task resumed by this step: its device blocks in token order, and
/// the host-to-device copies that restore its KV (swap_in[i].to == blocks[i]).
/// swap_in is empty after a recompute: prefill all its tokens into blocks.
/// swap_in.size() <= blocks.size(): a task paused while short of blocks (its
/// append_tokens had failed) comes back with blocks for all its tokens, and
/// the KV of the tokens past the first swap_in.size() blocks was never
/// written: compute it as the failed append would have had it succeeded.
struct Resumption {
  ScheduledTask task;
  std::vector<BlockId> blocks;
  std::vector<BlockCopy> swap_in;
};

/// What the serving loop must do this iteration (see the top of this file for
/// the order). Each list is in the order the engine decided it, and a task
/// appears in at most one list (a task is never admitted or resumed and
/// paused by the same step).
struct StepPlan {
  std::vector<Preemption> preempted;
  std::vector<Resumption> resumed;
  std::vector<Admission> admitted;
};

struct EngineStats {
  /// Tasks accepted and not yet admitted: the waiting queue (Scheduler::len())
  /// plus any task step() took out of it but holds back, because it was
  /// cancelled and re-submitted with other fields while step() took it (it is
  /// admitted after its priority's paused tasks, ahead of its waiting queue;
  /// docs/engine.md).
  std::size_t waiting = 0;
  std::size_t running = 0;  ///< admitted or resumed, not finished, paused or cancelled
  std::size_t paused = 0;   ///< preempted, not yet resumed
  std::size_t stalled = 0;  ///< running tasks short of blocks for their tokens
  std::uint32_t device_free_blocks = 0;
  std::uint32_t host_free_blocks = 0;  ///< 0 without a host pool
  std::uint64_t preemptions = 0;       ///< tasks paused, since construction
  std::uint64_t resumptions = 0;       ///< paused tasks resumed
  std::uint64_t recomputes = 0;        ///< preemptions that released the KV (no host room)
  std::uint64_t cut_short = 0;         ///< steps that ran out of memory mid-plan (see Engine::step)
};

class Engine {
 public:
  /// Throws std::invalid_argument, naming the field, when device_blocks,
  /// block_size, max_running or max_step_tokens is 0, max_running exceeds
  /// 2^20, a block count exceeds kMaxBlocks, or scheduler.max_queue_size is 0
  /// or above kMaxQueueSize - levels x max_running - 1,088 (levels: 4 with
  /// priority scheduling, else 1), because the engine's set of live ids, a
  /// Scheduler of at most kMaxQueueSize, also holds running, paused and
  /// in-flight ids. Reserves the engine's memory up front.
  explicit Engine(EngineConfig config);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;
  Engine(Engine&&) = delete;
  Engine& operator=(Engine&&) = delete;

  const EngineConfig& config() const noexcept;

  /// 1, 2, 3, ...: a fresh id from the waiting queue's counter
  /// (Scheduler::next_id()), unique across threads. Ids a caller picks itself
  /// share the id space: submit() reports DuplicateId for one that is waiting,
  /// running or paused. Any thread; wait-free.
  TaskId next_id() noexcept;

  /// Queues a copy of `task`. Empty on success; ScheduleError::InvalidPriority
  /// when task.priority is none of the four enumerators (checked first);
  /// ScheduleError::ExceedsCapacity
  /// when ceil(estimated_tokens / block_size) > device_blocks;
  /// ScheduleError::DuplicateId when a task with this id is waiting, running
  /// or paused (a running or paused task cancelled from another thread holds
  /// its id until the next step() carries the cancel out);
  /// ScheduleError::QueueFull when the waiting queue is full. On
  /// failure nothing changes. Any thread, concurrently with anything; two
  /// concurrent submits of one id: at most one succeeds (the other may report
  /// DuplicateId even if the first then fails with QueueFull; the second
  /// waits while the first is in flight). Lock-free otherwise, no allocation.
  [[nodiscard]] std::error_code submit(const ScheduledTask& task) noexcept;

  /// Cancels a waiting, running or paused task and frees every block it holds;
  /// false if no task with this id is waiting, running or paused, or if
  /// another cancel() already returned true for this task: at most one
  /// cancel() a task returns true. Any thread, concurrently with anything. On
  /// the serving-loop thread it takes effect at once (also for a task another
  /// thread's cancel had marked, which then still returns false). On another
  /// thread a waiting task is removed at once, and a running or paused one is
  /// marked: true is returned and its blocks are freed by the next step(),
  /// which also frees its id for submit() (if the loop finishes it first, it
  /// simply finishes). Lock-free, no allocation; a cancel of the task step()
  /// is taking out of the waiting queue at that moment waits for that take (a
  /// few instructions of the loop: it spins 64 times, then yields its time
  /// slice, a system call, while the loop stays descheduled there), so it
  /// never reports a task that another cancel had already removed.
  bool cancel(TaskId id) noexcept;

  /// Plans one iteration: carries out cancels from other threads, gives
  /// blocks to running tasks whose append_tokens failed (preempting if
  /// needed), then resumes paused and admits waiting tasks in priority order
  /// within the running, block and token budgets, preempting lower-priority
  /// work for the first task that does not fit. The plan stays valid until the
  /// next step(). Serving-loop thread only; concurrent with submit, cancel and
  /// stats. Allocates only to grow a recycled buffer past any size it has had:
  /// a plan vector, or the block list of a task slot, which keeps its capacity
  /// from task to task (a slot that held only small tasks grows to fit a
  /// larger one; while its task decodes it doubles its capacity). So
  /// allocation stops once every slot has held the largest task it will hold;
  /// a step with nothing to change never allocates.
  /// Out of memory: each decision (a preemption, resumption or admission) is
  /// made whole or not at all. If an allocation fails before the first
  /// decision, step() throws std::bad_alloc (cancels from other threads and
  /// growth served so far stay done; they need no plan entry). If one fails
  /// after it, step() returns the decisions made so far, which the caller
  /// must carry out like any plan, and counts the step in stats().cut_short;
  /// the next step() goes on from there. No task or block is ever lost.
  const StepPlan& step();

  /// A running task grew by n tokens (decode): takes a new device block at
  /// each block boundary, all or nothing. False, with nothing recorded, when
  /// the task is not running (paused included). False when the device pool
  /// has no block for it: the tokens are recorded, the task counts as
  /// stalled, and each step() tries to give it the blocks, first thing,
  /// preempting if it may (docs/engine.md, "What step() does"); one that
  /// cannot preempt waits for blocks to be freed, and one that now needs more
  /// blocks than the whole device pool stays stalled until it finishes or is
  /// cancelled. The block table grows geometrically. Serving-loop thread
  /// only. If it throws (std::bad_alloc, growing the block table), nothing
  /// changed: the tokens are not recorded.
  [[nodiscard]] bool append_tokens(TaskId id, std::size_t n);

  /// The running task completed: its blocks are freed. Does nothing for a task
  /// that is not running. Serving-loop thread only.
  void finish(TaskId id);

  /// The device blocks of a running task in token order (they change with
  /// append_tokens and with growth in step()); empty for any other task. Valid
  /// until the next loop call. Serving-loop thread only.
  std::span<const BlockId> block_table(TaskId id) const;

  /// The waiting queue, read-only (producers go through submit and cancel).
  /// Any thread.
  const Scheduler& scheduler() const noexcept;

  /// Counts and counters. Any thread: the queue's part of `waiting` and the
  /// free-block counts are read now, the rest (parked tasks included) as of
  /// the last serving-loop call (exact on the loop thread between its calls).
  EngineStats stats() const;

 private:
  std::unique_ptr<detail::EngineCore> core_;
};

}  // namespace tgi_gtc::scheduling
