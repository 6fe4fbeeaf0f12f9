// MoodycamelQueue (queues.hpp): the broken target built on moodycamel's
// ConcurrentQueue. Built without ThreadSanitizer instrumentation in the
// ThreadSanitizer build (tools/stress/CMakeLists.txt): moodycamel orders its
// memory with standalone fences, which ThreadSanitizer does not model. Only
// task values cross threads through it, copied in and out by this file.
#include <concurrentqueue/concurrentqueue.h>

#include "queues.hpp"

namespace tgi_gtc::stress::detail {

struct MoodycamelQueue::Impl {
  using Queue = moodycamel::ConcurrentQueue<ScheduledTask>;

  std::size_t capacity;
  std::size_t classes;
  std::vector<std::unique_ptr<Queue>> queues;
  std::vector<std::unique_ptr<moodycamel::ProducerToken>> tokens;  // [thread * classes + class]
  alignas(64) std::atomic<std::size_t> size{0};  // reserved before enqueue, released after dequeue: never above capacity

  std::size_t cls(Priority p) const { return classes == 1 ? 0 : scheduling::value(p); }
};

MoodycamelQueue::MoodycamelQueue(std::size_t capacity, bool priority_mode, unsigned threads) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.capacity = capacity;
  m.classes = priority_mode ? scheduling::kPriorityCount : 1;
  for (std::size_t c = 0; c < m.classes; ++c) m.queues.push_back(std::make_unique<Impl::Queue>(capacity));
  for (unsigned w = 0; w < threads; ++w) {
    for (std::size_t c = 0; c < m.classes; ++c) m.tokens.push_back(std::make_unique<moodycamel::ProducerToken>(*m.queues[c]));
  }
}

MoodycamelQueue::~MoodycamelQueue() = default;

std::error_code MoodycamelQueue::schedule(unsigned w, const ScheduledTask& t) {
  Impl& m = *impl_;
  // Reserve a place without ever counting past the capacity (len() reads it).
  std::size_t n = m.size.load();
  do {
    if (n >= m.capacity) return ScheduleError::QueueFull;
  } while (!m.size.compare_exchange_weak(n, n + 1));
  const std::size_t c = m.cls(t.priority);
  m.queues[c]->enqueue(*m.tokens[w * m.classes + c], t);
  return {};
}

std::optional<ScheduledTask> MoodycamelQueue::next(unsigned) {
  Impl& m = *impl_;
  ScheduledTask t(0, 0);
  for (std::size_t c = m.classes; c-- > 0;) {
    if (m.queues[c]->try_dequeue(t)) {
      m.size.fetch_sub(1);
      return t;
    }
  }
  return std::nullopt;
}

std::vector<ScheduledTask> MoodycamelQueue::clear() {
  std::vector<ScheduledTask> out;
  while (auto t = next(0)) out.push_back(*t);
  return out;
}

std::size_t MoodycamelQueue::len() const noexcept { return impl_->size.load(); }

}  // namespace tgi_gtc::stress::detail
