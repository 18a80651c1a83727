//! Software prefetch: a hint that a cache line will be read soon.
//!
//! Hardware prefetchers follow a stream only within a 4 KiB page. A 7B model's FP8 rows are one
//! page each, so a kernel that walks rows, or any long read of the mapped weights, stalls at every
//! page start unless it names the next lines itself. A prefetch never faults, so any address,
//! even one past an allocation, is allowed.

/// Bytes per cache line on the CPUs marengo targets (x86_64 and ARMv8 cores alike).
pub(crate) const LINE: usize = 64;

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
