// Private: the spin-wait hint shared by the Scheduler and the Engine.
#pragma once

namespace tgi_gtc::scheduling::detail {

/// Tells the core this thread is spinning (x86 PAUSE, AArch64 YIELD).
inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

}  // namespace tgi_gtc::scheduling::detail
