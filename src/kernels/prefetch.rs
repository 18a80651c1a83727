//! Software prefetch: a hint that a cache line will be read soon.
//!
//! Hardware prefetchers follow a stream only within a 4 KiB page. A 7B model's FP8 rows are one
//! page each, so a kernel that walks rows, or any long read of the mapped weights, stalls at every
//! page start unless it names the next lines itself. A prefetch never faults, so any address,
//! even one past an allocation, is allowed.

/// Bytes per cache line on the CPUs marengo targets (x86_64 and ARMv8 cores alike).
pub(crate) const LINE: usize = 64;

/// How far ahead of its reads a kernel streaming the weights asks for them, into L2.
///
/// A memory read takes about 100 ns, so a core streams at full speed only with a few hundred
/// lines in flight, far more than L1 can track: the lines are asked for well ahead, into L2.
/// Measured on Zen 4 (one thread, FP8 rows two at a time, 1536×576 to 4096×4096), GB/s:
/// the next rows' lines into L1 as they were asked for before, 9.6–14.7; into L2 4 KiB
/// ahead, 12–19; 8 KiB, 24–27; 16 KiB, 24.6–28.2; 24 KiB, 23.7–25.4; a plain sum of the
/// same bytes, 28–32.
pub(crate) const AHEAD: usize = 16 << 10;

/// Asks for the line [`AHEAD`] bytes after `ptr` in L2: called once per line a kernel reads.
#[inline(always)]
pub(crate) fn prefetch_ahead(ptr: *const u8) {
    prefetch_l2(ptr.wrapping_add(AHEAD));
}

/// Asks for the line holding `ptr` in the L1 cache.
#[inline(always)]
pub(crate) fn prefetch(ptr: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of x86_64; a prefetch reads nothing architecturally.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(ptr.cast())
    };
    #[cfg(target_arch = "aarch64")]
    // SAFETY: PRFM is a hint and never faults.
    unsafe {
        std::arch::asm!(
            "prfm pldl1keep, [{p}]",
            p = in(reg) ptr,
            options(nostack, readonly, preserves_flags)
        )
    };
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = ptr;
}

/// Asks for the line holding `ptr` in the L2 cache: for data needed after a long computation
/// that itself fills L1.
#[inline(always)]
pub(crate) fn prefetch_l2(ptr: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of x86_64; a prefetch reads nothing architecturally.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(ptr.cast())
    };
    #[cfg(target_arch = "aarch64")]
    // SAFETY: PRFM is a hint and never faults.
    unsafe {
        std::arch::asm!(
            "prfm pldl2keep, [{p}]",
            p = in(reg) ptr,
            options(nostack, readonly, preserves_flags)
        )
    };
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = ptr;
}
