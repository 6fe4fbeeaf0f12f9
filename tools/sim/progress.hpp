// A progress bar on stderr, drawn only when stderr is a terminal and only once
// the run has taken a second. The wall clock it reads never reaches results.
#pragma once

#include <chrono>
#include <cstddef>
#include <string>

namespace tgi_gtc::sim {

class ProgressBar {
 public:
  /// `total` units of work over the whole run; disabled when stderr is not a
  /// terminal or `enabled` is false.
  ProgressBar(std::size_t total, bool enabled);
  ~ProgressBar();
  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;

  /// `done` units finished so far; `label` says what is running.
  void update(std::size_t done, const std::string& label);
  /// Erases the bar if it was drawn.
  void clear();

 private:
  std::size_t total_;
  bool enabled_;
  bool drawn_ = false;
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_draw_{};
};

}  // namespace tgi_gtc::sim
