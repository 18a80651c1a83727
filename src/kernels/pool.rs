//! The kernels' worker pool: `threads - 1` workers plus the calling thread, which takes tasks
//! itself, so that a parallel kernel costs a store and a few cache-line transfers rather than a
//! sleep and a wake-up.
//!
//! A decode step is a chain of some 200 short parallel kernels separated by a few microseconds of
//! single-threaded graph work. rayon's workers go to sleep within that gap and every kernel then
//! pays a futex wake-up on each side (a third of a small model's decode time went there). Here an
//! idle worker spins on the epoch counter for [`SPIN`] after its last task, which covers the gaps
//! inside a step and between steps, and only then blocks on a condition variable, so that an idle
//! daemon uses no CPU.
//!
//! Why not a crate: rayon, the one in the tree, is what we leave (its sleep heuristics are the
//! cost); the low-latency fork-join pools on crates.io either spin until told to sleep
//! (no bounded spin, so an idle daemon would burn its cores), or are work-stealing schedulers
//! built for nested `join` with their own iterator layer, more machinery than the kernels'
//! one flat loop needs.
//!
//! A call ([`Pool::run`]) publishes a job (the task count and the closure) and bumps the epoch;
//! every thread, the caller included, claims task indices from a shared counter until none are
//! left, so that a worker the OS has descheduled only delays the tasks it already holds. The
//! caller then withdraws the job and waits until no worker still holds it. A call made while
//! another is running (from inside a task, or from a second thread) runs its tasks inline, so
//! calls never wait on each other.

use std::any::Any;
use std::cell::RefCell;
use std::panic::{self, AssertUnwindSafe};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::KernelError;

/// How long an idle worker spins before it blocks: longer than the single-threaded stretches of a
/// decode step (graph ops, sampling, the next token's start), short enough that a daemon between
/// requests is idle almost at once. Chosen by measurement (see the module's tests and the
/// benchmark figures in the commit that set it).
const SPIN: Duration = Duration::from_millis(2);

/// Spin-loop hints between two offers of the core to another thread (`sched_yield`): on a core
/// of its own a worker only pays the system call, and on a machine busy with other work the
/// thread that has the next kernel to start (the caller) is not kept off the core by a spinner.
const SPINS_PER_YIELD: u32 = 64;

/// A call's closure and task count, on the caller's stack while the call runs.
struct Job<'a> {
    tasks: usize,
    task: &'a (dyn Fn(usize) + Sync),
}

/// What the threads of one pool share.
struct Shared {
    /// Names the workers (`kernels<id>.<index>`), so that tools and tests tell pools apart.
    id: usize,
    /// Threads taking tasks, the caller included.
    threads: usize,
    /// Bumped for every published job, and once more when the pool is dropped.
    epoch: AtomicU64,
    /// The running call's job, null between calls. Type-erased: a `Job` of any lifetime.
    job: AtomicPtr<Job<'static>>,
    /// The next task index to claim.
    next: AtomicUsize,
    /// Workers that have read `job` and may still use it.
    holders: AtomicUsize,
    /// Whether a call is running (a second one runs inline).
    busy: AtomicBool,
    /// The first panic of the running call's tasks, re-raised on the caller.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    /// Workers blocked on `wake`, so that a call notifies only when someone sleeps.
    sleepers: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
    stop: AtomicBool,
}

/// A fixed set of worker threads for the kernels. Most code uses the process-wide pool through
/// [`run`]; tests and benchmarks make their own and [`Pool::install`] it.
pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

thread_local! {
    /// The pool [`run`] uses on this thread when it is not the process-wide one: set for the
    /// duration of [`Pool::install`], and for good on a pool's own workers.
    static CURRENT: RefCell<Option<Arc<Shared>>> = const { RefCell::new(None) };
}

static GLOBAL: OnceLock<Pool> = OnceLock::new();
static POOLS: AtomicUsize = AtomicUsize::new(0);

impl Pool {
    /// A pool of `threads` (at least 1) threads: the caller of each [`Pool::run`] and
    /// `threads - 1` workers.
    pub fn new(threads: usize) -> Pool {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            id: POOLS.fetch_add(1, SeqCst),
            threads,
            epoch: AtomicU64::new(0),
            job: AtomicPtr::new(ptr::null_mut()),
            next: AtomicUsize::new(0),
            holders: AtomicUsize::new(0),
            busy: AtomicBool::new(false),
            panic: Mutex::new(None),
            sleepers: AtomicUsize::new(0),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let workers = (1..threads)
            .map(|index| {
                let shared = shared.clone();
                thread::Builder::new()
                    .name(format!("kernels{}.{index}", shared.id))
                    .spawn(move || work(shared))
                    .expect("spawning a kernel thread")
            })
            .collect();
        Pool { shared, workers }
    }

    /// Threads taking tasks, the caller included.
    pub fn threads(&self) -> usize {
        self.shared.threads
    }

    /// Runs `task(index)` once for every index in `0..tasks`, spread over the pool's threads,
    /// and returns when all have run. A panic in a task is re-raised here once every task has
    /// finished.
    pub fn run(&self, tasks: usize, task: impl Fn(usize) + Sync) {
        self.shared.run(tasks, &task);
    }

    /// Runs `f` with this pool as the one [`run`] (and so every kernel) uses on this thread.
    pub fn install<R>(&self, f: impl FnOnce() -> R) -> R {
        struct Restore(Option<Arc<Shared>>);
        impl Drop for Restore {
            fn drop(&mut self) {
                CURRENT.set(self.0.take());
            }
        }
        let _restore = Restore(CURRENT.replace(Some(self.shared.clone())));
        f()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        self.shared.publish();
        for worker in self.workers.drain(..) {
            // A worker never panics: tasks run under `catch_unwind`.
            let _ = worker.join();
        }
    }
}

/// Sizes the process-wide pool. It can be set once per process (or not at all, when the first
/// kernel call sizes it to every core); a later different request is refused.
pub fn set_threads(threads: usize) -> Result<(), KernelError> {
    let pool = GLOBAL.get_or_init(|| Pool::new(threads));
    if pool.threads() == threads {
        Ok(())
    } else {
        Err(KernelError::ThreadsAlreadySet {
            current: pool.threads(),
        })
    }
}

/// [`Pool::run`] on the current thread's pool: the installed one, a worker's own, or the
/// process-wide one.
pub fn run(tasks: usize, task: impl Fn(usize) + Sync) {
    with_current(|shared| shared.run(tasks, &task));
}

/// Threads of the current thread's pool (see [`run`]): what a kernel splits its work for.
pub fn threads() -> usize {
    with_current(|shared| shared.threads)
}

/// Splits `data` into chunks of `chunk` elements (the last may be shorter) and runs
/// `task(index, chunk)` for each, as [`run`] does.
pub fn for_each_chunk_mut<T: Send>(
    data: &mut [T],
    chunk: usize,
    task: impl Fn(usize, &mut [T]) + Sync,
) {
    let chunk = chunk.max(1);
    let len = data.len();
    let start = SendPtr(data.as_mut_ptr());
    run(len.div_ceil(chunk), |index| {
        let first = index * chunk;
        let count = chunk.min(len - first);
        // SAFETY: `run` calls each index once, so the chunks handed out are disjoint parts of
        // `data`, which stays mutably borrowed until `run` returns.
        let part = unsafe { std::slice::from_raw_parts_mut(start.get().add(first), count) };
        task(index, part);
    });
}

/// A pointer to a slice whose disjoint parts are handed to different threads.
struct SendPtr<T>(*mut T);

impl<T> SendPtr<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

// SAFETY: only used by `for_each_chunk_mut`, where each thread touches its own elements (T: Send).
unsafe impl<T: Send> Sync for SendPtr<T> {}

fn with_current<R>(f: impl FnOnce(&Shared) -> R) -> R {
    match CURRENT.with_borrow(Clone::clone) {
        Some(shared) => f(&shared),
        None => f(&GLOBAL.get_or_init(default_pool).shared),
    }
}

fn default_pool() -> Pool {
    Pool::new(thread::available_parallelism().map_or(1, usize::from))
}

impl Shared {
    fn run(&self, tasks: usize, task: &(dyn Fn(usize) + Sync)) {
        if tasks <= 1
            || self.threads == 1
            || self
                .busy
                .compare_exchange(false, true, SeqCst, SeqCst)
                .is_err()
        {
            (0..tasks).for_each(task);
            return;
        }
        let job = Job { tasks, task };
        self.next.store(0, SeqCst);
        // SAFETY (of the erased lifetime): `job` outlives its publication: it is withdrawn
        // below, and the call returns only once no worker holds it.
        let published: *const Job<'static> = (&raw const job).cast();
        self.job.store(published.cast_mut(), SeqCst);
        self.publish();
        let mine = panic::catch_unwind(AssertUnwindSafe(|| self.take_tasks(&job)));
        self.job.store(ptr::null_mut(), SeqCst);
        spin_until(|| self.holders.load(SeqCst) == 0);
        let theirs = self
            .panic
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        self.busy.store(false, SeqCst);
        if let Err(payload) = mine {
            panic::resume_unwind(payload);
        }
        if let Some(payload) = theirs {
            panic::resume_unwind(payload);
        }
    }

    /// Starts a new epoch and wakes the workers that sleep.
    fn publish(&self) {
        self.epoch.fetch_add(1, SeqCst);
        if self.sleepers.load(SeqCst) > 0 {
            let _guard = self.sleep.lock().unwrap_or_else(PoisonError::into_inner);
            self.wake.notify_all();
        }
    }

    fn take_tasks(&self, job: &Job) {
        loop {
            let index = self.next.fetch_add(1, SeqCst);
            if index >= job.tasks {
                return;
            }
            (job.task)(index);
        }
    }

    /// A worker's part of the epoch it has seen: the tasks it can claim of the job, if one is
    /// still published.
    fn help(&self) {
        self.holders.fetch_add(1, SeqCst);
        let job = self.job.load(SeqCst);
        if !job.is_null() {
            // SAFETY: the job was published and not yet withdrawn when read, after this worker
            // counted itself in `holders`; its caller keeps it alive until `holders` is 0.
            let job = unsafe { &*job };
            if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(|| self.take_tasks(job))) {
                let mut first = self.panic.lock().unwrap_or_else(PoisonError::into_inner);
                first.get_or_insert(payload);
            }
        }
        self.holders.fetch_sub(1, SeqCst);
    }

    /// Waits, spinning for [`SPIN`] and then blocking, until the epoch differs from `seen`.
    fn wait_for_epoch(&self, seen: u64) -> u64 {
        let start = Instant::now();
        while start.elapsed() < SPIN {
            for _ in 0..SPINS_PER_YIELD {
                let epoch = self.epoch.load(SeqCst);
                if epoch != seen {
                    return epoch;
                }
                std::hint::spin_loop();
            }
            thread::yield_now();
        }
        let mut guard = self.sleep.lock().unwrap_or_else(PoisonError::into_inner);
        self.sleepers.fetch_add(1, SeqCst);
        let mut epoch = self.epoch.load(SeqCst);
        while epoch == seen {
            guard = self
                .wake
                .wait(guard)
                .unwrap_or_else(PoisonError::into_inner);
            epoch = self.epoch.load(SeqCst);
        }
        self.sleepers.fetch_sub(1, SeqCst);
        epoch
    }
}

/// A worker's life: wait for an epoch, help with its job, again until the pool is dropped.
fn work(shared: Arc<Shared>) {
    CURRENT.set(Some(shared.clone()));
    // The epoch the pool was made with, not the current one: a call or the drop that came
    // before this thread started must still be seen.
    let mut seen = 0;
    loop {
        seen = shared.wait_for_epoch(seen);
        if shared.stop.load(SeqCst) {
            return;
        }
        shared.help();
    }
}

/// Spins until `done`, yielding the core now and then in case the thread it waits for is
/// descheduled on it.
fn spin_until(done: impl Fn() -> bool) {
    let mut spins = 0u32;
    while !done() {
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(SPINS_PER_YIELD) {
            thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

    use super::*;

    /// Each index of `0..tasks` run on `pool`, counted.
    fn counts(pool: &Pool, tasks: usize) -> Vec<u32> {
        let counts: Vec<AtomicU32> = (0..tasks).map(|_| AtomicU32::new(0)).collect();
        pool.run(tasks, |index| {
            counts[index].fetch_add(1, Relaxed);
        });
        counts.into_iter().map(AtomicU32::into_inner).collect()
    }

    #[test]
    fn every_index_runs_exactly_once() {
        for threads in 1..=4 {
            let pool = Pool::new(threads);
            for tasks in [0, 1, 2, 3, 7, 64, 1000] {
                assert_eq!(counts(&pool, tasks), vec![1; tasks], "{threads} threads");
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_thread_count() {
        let square_sums: Vec<Vec<u64>> = (1..=4)
            .map(|threads| {
                let mut out = vec![0u64; 1001];
                Pool::new(threads).install(|| {
                    for_each_chunk_mut(&mut out, 37, |index, chunk| {
                        for (i, value) in chunk.iter_mut().enumerate() {
                            let n = (index * 37 + i) as u64;
                            *value = n * n;
                        }
                    });
                });
                out
            })
            .collect();
        let expected: Vec<u64> = (0..1001u64).map(|n| n * n).collect();
        for out in square_sums {
            assert_eq!(out, expected);
        }
    }

    #[test]
    fn a_panic_reaches_the_caller_and_the_pool_goes_on() {
        for threads in 1..=3 {
            let pool = Pool::new(threads);
            for bad in [0, 5, 15] {
                let result = panic::catch_unwind(AssertUnwindSafe(|| {
                    pool.run(16, |index| assert_ne!(index, bad, "task {index} fails"));
                }));
                let payload = result.expect_err("the task's panic reaches the caller");
                let message = payload.downcast_ref::<String>().expect("a formatted panic");
                assert!(message.contains(&format!("task {bad} fails")), "{message}");
                assert_eq!(counts(&pool, 16), vec![1; 16]);
            }
        }
    }

    #[test]
    fn nested_calls_complete() {
        let pool = Pool::new(3);
        let inner: Vec<AtomicU32> = (0..8 * 8).map(|_| AtomicU32::new(0)).collect();
        pool.install(|| {
            run(8, |outer| {
                run(8, |index| {
                    inner[outer * 8 + index].fetch_add(1, Relaxed);
                });
            });
        });
        assert!(inner.iter().all(|count| count.load(Relaxed) == 1));
    }

    #[test]
    fn concurrent_calls_complete() {
        let pool = Pool::new(2);
        let total = AtomicU32::new(0);
        thread::scope(|scope| {
            for _ in 0..3 {
                scope.spawn(|| {
                    for _ in 0..200 {
                        pool.run(10, |_| {
                            total.fetch_add(1, Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(total.into_inner(), 3 * 200 * 10);
    }

    #[test]
    fn many_tiny_calls_complete() {
        let pool = Pool::new(4);
        let total = AtomicU32::new(0);
        for _ in 0..100_000 {
            pool.run(3, |_| {
                total.fetch_add(1, Relaxed);
            });
        }
        assert_eq!(total.into_inner(), 300_000);
    }

    #[test]
    fn idle_workers_block() {
        let pool = Pool::new(3);
        pool.run(8, |_| {});
        // No timing is asserted: the workers must come to sleep (state S) at some point, well
        // within the generous bound, instead of spinning (R) for good.
        let mut states = worker_states(&pool);
        for _ in 0..1000 {
            if states.len() == 2 && states.iter().all(|&state| state == 'S') {
                break;
            }
            thread::sleep(Duration::from_millis(10));
            states = worker_states(&pool);
        }
        assert_eq!(states, vec!['S', 'S']);
        assert_eq!(counts(&pool, 5), vec![1; 5]);
    }

    /// The scheduler states (`/proc/self/task/*/stat`) of `pool`'s workers.
    fn worker_states(pool: &Pool) -> Vec<char> {
        let prefix = format!("kernels{}.", pool.shared.id);
        let mut states = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").expect("procfs") {
            let path = task.expect("task entry").path();
            let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
            if !comm.starts_with(&prefix) {
                continue;
            }
            let stat = std::fs::read_to_string(path.join("stat")).expect("task stat");
            let after_name = &stat[stat.rfind(')').expect("stat has a name") + 2..];
            states.push(after_name.chars().next().expect("a state"));
        }
        states
    }
}
