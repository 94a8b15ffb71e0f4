//! The exchanges of a sharded evaluation ([`crate::parallel`]), behind one small trait,
//! [`Collective`]: this rank, the number of ranks, and one all-gather of 64-bit words.
//! Everything the shards exchange — the per-row partials of the vocabulary, the sums of
//! row blocks, the status of every rank — is built on it here, so an engine plugs in by
//! implementing three methods: [`LocalGroup`] (threads of one process: the tests, the
//! adapters of one host), `Mpi` with the `mpi` feature (processes
//! and machines), or a caller's own (NCCL, torch.distributed, ...).
//!
//! Failure is part of the protocol: every step ends with [`agree`], which exchanges each
//! rank's status, so a rank with bad input or a failed device makes every rank return an
//! error ([`Error::Peer`] naming it) at the same step instead of leaving the others
//! waiting. The in-process group also bounds every wait ([`LocalGroup::with_timeout`]) and
//! fails at once when a rank leaves the group (a panicking thread).
//!
//! ```
//! use xent::collective::{Collective, LocalGroup};
//! let ranks = LocalGroup::new(3);
//! let got: Vec<Vec<Vec<u64>>> = std::thread::scope(|s| {
//!     let running: Vec<_> = ranks.iter().map(|c| s.spawn(move || c.all_gather(&[c.rank() as u64; 2]).unwrap())).collect();
//!     running.into_iter().map(|h| h.join().unwrap()).collect()
//! });
//! assert!(got.iter().all(|g| *g == vec![vec![0, 0], vec![1, 1], vec![2, 2]]));
//! ```

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::metrics::MetricSums;
use crate::vocab::VocabPartial;

/// A group of ranks that can all-gather words: what a sharded evaluation needs of a
/// communication engine.
pub trait Collective {
    /// This rank, in `0..size()`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// Every rank's `mine`, in rank order, on every rank; ranks may give different
    /// lengths. Every rank must call it the same number of times.
    fn all_gather(&self, mine: &[u64]) -> Result<Vec<Vec<u64>>>;
}

/// Exchanges every rank's `status` and returns, on every rank, the same verdict: this
/// rank's own value when every rank succeeded, its own error when it failed, and
/// [`Error::Peer`] naming the first failed rank otherwise.
pub fn agree<T>(c: &dyn Collective, status: Result<T>) -> Result<T> {
    let mine = match &status {
        Ok(_) => vec![0],
        Err(e) => {
            let mut words = vec![if e.is_bad_input() { 2 } else { 1 }];
            words.extend(pack_bytes(e.to_string().as_bytes()));
            words
        }
    };
    let all = c.all_gather(&mine)?;
    let failed = all.iter().enumerate().find(|(_, w)| w.first().is_some_and(|&s| s != 0));
    match (status, failed) {
        (Err(e), _) => Err(e),
        (Ok(v), None) => Ok(v),
        (Ok(_), Some((rank, words))) => Err(Error::Peer {
            rank,
            bad_input: words[0] == 2,
            message: String::from_utf8_lossy(&unpack_bytes(&words[1..])).into_owned(),
        }),
    }
}

/// Bytes in words, the length first.
fn pack_bytes(b: &[u8]) -> Vec<u64> {
    let mut out = vec![b.len() as u64];
    out.extend(b.chunks(8).map(|c| {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        u64::from_le_bytes(w)
    }));
    out
}

fn unpack_bytes(w: &[u64]) -> Vec<u8> {
    let n = w.first().map_or(0, |&n| n as usize);
    w.iter().skip(1).flat_map(|x| x.to_le_bytes()).take(n).collect()
}

/// Sums f64 values element by element over the ranks, in rank order (the same bits on
/// every rank, whatever the engine's reduction order).
pub fn sum_f64(c: &dyn Collective, mine: &[f64]) -> Result<Vec<f64>> {
    let words: Vec<u64> = mine.iter().map(|x| x.to_bits()).collect();
    let all = c.all_gather(&words)?;
    let mut acc = vec![0.0f64; mine.len()];
    for part in &all {
        if part.len() != mine.len() {
            return Err(Error::Collective(format!(
                "ranks gave {} and {} values to sum",
                part.len(),
                mine.len()
            )));
        }
        acc.iter_mut().zip(part).for_each(|(a, &w)| *a += f64::from_bits(w));
    }
    Ok(acc)
}

/// Sums f32 values element by element over the ranks: two a word on the wire, added in
/// f64 in rank order and rounded once (the same bits on every rank).
pub fn sum_f32(c: &dyn Collective, mine: &[f32]) -> Result<Vec<f32>> {
    if c.size() == 1 {
        // The sum of one rank's values, exactly (no exchange, no copy through f64).
        return Ok(mine.to_vec());
    }
    let words: Vec<u64> = mine
        .chunks(2)
        .map(|p| u64::from(p[0].to_bits()) | u64::from(p.get(1).map_or(0, |x| x.to_bits())) << 32)
        .collect();
    let all = c.all_gather(&words)?;
    let mut acc = vec![0.0f64; mine.len()];
    for part in &all {
        if part.len() != words.len() {
            return Err(Error::Collective(format!(
                "ranks gave {} and {} words to sum",
                part.len(),
                words.len()
            )));
        }
        for (pair, &w) in acc.chunks_mut(2).zip(part) {
            pair[0] += f64::from(f32::from_bits(w as u32));
            if let Some(b) = pair.get_mut(1) {
                *b += f64::from(f32::from_bits((w >> 32) as u32));
            }
        }
    }
    Ok(acc.into_iter().map(|x| x as f32).collect())
}

/// Which fields of a [`VocabPartial`] travel: the state and the target always, label
/// smoothing's sum when it is on, the metrics' spread and argmax when they are asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wire {
    /// Carry [`VocabPartial::smooth`].
    pub smooth: bool,
    /// Carry [`VocabPartial::spread`], [`VocabPartial::argmax`] and [`VocabPartial::nan`].
    pub metrics: bool,
}

impl Wire {
    /// The fields a problem under `opts` needs.
    pub fn of(opts: &crate::LossOptions) -> Self {
        Wire { smooth: opts.get_label_smoothing() > 0.0, metrics: opts.get_metrics().is_some() }
    }

    /// Words a row: 2, plus 1 for smoothing, plus 2 for the metrics.
    pub fn words(self) -> usize {
        2 + usize::from(self.smooth) + 2 * usize::from(self.metrics)
    }

    /// One row's partial as [`words`](Self::words) words.
    pub fn pack(self, p: &VocabPartial, out: &mut Vec<u64>) {
        let bits = |x: f32| u64::from(x.to_bits());
        out.push(bits(p.state.max) | bits(p.state.sum) << 32);
        let flags =
            u64::from(p.target.is_some()) | u64::from(p.nan) << 1 | u64::from(p.argmax.is_some()) << 2;
        out.push(bits(p.target.unwrap_or(0.0)) | flags << 32);
        if self.smooth {
            out.push(p.smooth.to_bits());
        }
        if self.metrics {
            out.push(p.spread.to_bits());
            let (c, v) = p.argmax.unwrap_or((0, 0.0));
            out.push(c as u64 | bits(v) << 32);
        }
    }

    /// The partial of [`pack`](Self::pack)'s words (fields that did not travel are 0).
    pub fn unpack(self, w: &[u64]) -> VocabPartial {
        let lo = |x: u64| f32::from_bits(x as u32);
        let hi = |x: u64| f32::from_bits((x >> 32) as u32);
        let flags = w[1] >> 32;
        let mut p = VocabPartial {
            state: crate::RowState { max: lo(w[0]), sum: hi(w[0]) },
            target: (flags & 1 != 0).then(|| lo(w[1])),
            nan: flags & 2 != 0,
            ..VocabPartial::EMPTY
        };
        let mut k = 2;
        if self.smooth {
            p.smooth = f64::from_bits(w[k]);
            k += 1;
        }
        if self.metrics {
            p.spread = f64::from_bits(w[k]);
            p.argmax = (flags & 4 != 0).then(|| ((w[k + 1] & 0xffff_ffff) as usize, hi(w[k + 1])));
        }
        p
    }
}

/// Every rank's partials of the same rows merged, in rank order (shard 0's columns first):
/// the same merged partials on every rank.
pub fn all_reduce_partials(
    c: &dyn Collective,
    mine: &[VocabPartial],
    wire: Wire,
) -> Result<Vec<VocabPartial>> {
    if mine.len() > (u32::MAX as usize) {
        return Err(Error::InvalidOption(format!("{} rows: at most 2^32 − 1 rows a shard", mine.len())));
    }
    let mut words = Vec::with_capacity(mine.len() * wire.words());
    mine.iter().for_each(|p| wire.pack(p, &mut words));
    let all = c.all_gather(&words)?;
    let mut merged = vec![VocabPartial::EMPTY; mine.len()];
    for (rank, part) in all.iter().enumerate() {
        if part.len() != words.len() {
            return Err(Error::Collective(format!(
                "rank {rank} sent {} words of partials, this rank {}: the ranks disagree on the rows",
                part.len(),
                words.len()
            )));
        }
        for (m, w) in merged.iter_mut().zip(part.chunks_exact(wire.words())) {
            *m = m.combine(wire.unpack(w));
        }
    }
    Ok(merged)
}

/// Sums u64 counts element by element over the ranks.
pub fn sum_u64(c: &dyn Collective, mine: &[u64]) -> Result<Vec<u64>> {
    let all = c.all_gather(mine)?;
    let mut acc = vec![0u64; mine.len()];
    for part in &all {
        if part.len() != mine.len() {
            return Err(Error::Collective(format!(
                "ranks gave {} and {} counts to sum",
                part.len(),
                mine.len()
            )));
        }
        acc.iter_mut().zip(part).for_each(|(a, &w)| *a += w);
    }
    Ok(acc)
}

/// Metric sums combined over the ranks in rank order (every rank's for the same spec).
pub fn combine_metric_sums(c: &dyn Collective, mine: &MetricSums) -> Result<MetricSums> {
    let mut words = vec![mine.counted, mine.correct, mine.nll.to_bits(), mine.entropy.to_bits()];
    words.extend(mine.top_k.iter().map(|&(_, n)| n));
    for b in &mine.bins {
        words.extend([b.count, b.confidence.to_bits(), b.correct]);
    }
    let all = c.all_gather(&words)?;
    let mut total = MetricSums { counted: 0, correct: 0, nll: 0.0, entropy: 0.0, ..mine.clone() };
    total.top_k.iter_mut().for_each(|t| t.1 = 0);
    total.bins.iter_mut().for_each(|b| *b = Default::default());
    for w in &all {
        if w.len() != words.len() {
            return Err(Error::Collective("the ranks' metric specs disagree".into()));
        }
        let k = mine.top_k.len();
        let mut s = MetricSums {
            counted: w[0],
            correct: w[1],
            nll: f64::from_bits(w[2]),
            entropy: f64::from_bits(w[3]),
            ..mine.clone()
        };
        s.top_k.iter_mut().zip(&w[4..4 + k]).for_each(|(t, &n)| t.1 = n);
        for (b, x) in s.bins.iter_mut().zip(w[4 + k..].chunks_exact(3)) {
            *b = crate::metrics::CalibrationBin {
                count: x[0],
                confidence: f64::from_bits(x[1]),
                correct: x[2],
            };
        }
        total.add(&s);
    }
    Ok(total)
}

/// A collective that counts the bytes this rank sends (its words in every all-gather):
/// what `xent eval --parallel` reports as the exchange's cost.
pub struct Metered<'a> {
    inner: &'a dyn Collective,
    sent: std::cell::Cell<u64>,
}

impl<'a> Metered<'a> {
    /// Counts what `inner` sends from now on.
    pub fn new(inner: &'a dyn Collective) -> Self {
        Metered { inner, sent: std::cell::Cell::new(0) }
    }
    /// Bytes this rank has sent.
    pub fn sent_bytes(&self) -> u64 {
        self.sent.get()
    }
}

impl Collective for Metered<'_> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn all_gather(&self, mine: &[u64]) -> Result<Vec<Vec<u64>>> {
        self.sent.set(self.sent.get() + 8 * mine.len() as u64);
        self.inner.all_gather(mine)
    }
}

/// The ranks of one process: threads that exchange through shared memory. Each member is
/// one rank; hand one to each thread. Every wait is bounded (five minutes unless
/// [`with_timeout`](Self::with_timeout) says otherwise), and a member dropped while
/// its thread panics breaks the group, so that no rank waits for it.
pub struct LocalGroup {
    rank: usize,
    size: usize,
    timeout: Duration,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LocalGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalGroup(rank {} of {})", self.rank, self.size)
    }
}

struct Shared {
    round: Mutex<Round>,
    cv: Condvar,
}

struct Round {
    /// Completed exchanges.
    generation: u64,
    slots: Vec<Option<Vec<u64>>>,
    arrived: usize,
    /// The last completed exchange's words.
    result: Arc<Vec<Vec<u64>>>,
    /// Why the group can exchange no more.
    broken: Option<String>,
}

impl LocalGroup {
    /// `size` ranks (at least one), in rank order.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(size: usize) -> Vec<LocalGroup> {
        Self::with_timeout(size, Duration::from_secs(300))
    }

    /// As [`new`](Self::new), each exchange failing after `timeout` without every rank.
    pub fn with_timeout(size: usize, timeout: Duration) -> Vec<LocalGroup> {
        let size = size.max(1);
        let shared = Arc::new(Shared {
            round: Mutex::new(Round {
                generation: 0,
                slots: vec![None; size],
                arrived: 0,
                result: Arc::new(Vec::new()),
                broken: None,
            }),
            cv: Condvar::new(),
        });
        (0..size).map(|rank| LocalGroup { rank, size, timeout, shared: shared.clone() }).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Round> {
        // A panic while holding the lock cannot leave a round half-updated in a way that
        // matters: the panicking member breaks the group on drop.
        self.shared.round.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Collective for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_gather(&self, mine: &[u64]) -> Result<Vec<Vec<u64>>> {
        let deadline = Instant::now() + self.timeout;
        let mut round = self.lock();
        if let Some(why) = &round.broken {
            return Err(Error::Collective(why.clone()));
        }
        let generation = round.generation;
        if round.slots[self.rank].is_some() {
            // The same rank twice in one exchange: a caller's bug, which would otherwise
            // complete the exchange without another rank.
            return Err(Error::Collective(format!("rank {} is already in this exchange", self.rank)));
        }
        round.slots[self.rank] = Some(mine.to_vec());
        round.arrived += 1;
        if round.arrived == self.size {
            let words: Vec<Vec<u64>> = round.slots.iter_mut().map(|s| s.take().unwrap_or_default()).collect();
            round.result = Arc::new(words);
            round.arrived = 0;
            round.generation += 1;
            self.shared.cv.notify_all();
            return Ok(round.result.as_ref().clone());
        }
        loop {
            if round.generation != generation {
                return Ok(round.result.as_ref().clone());
            }
            if let Some(why) = &round.broken {
                return Err(Error::Collective(why.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<usize> = (0..self.size).filter(|&r| round.slots[r].is_none()).collect();
                let why = format!(
                    "rank {} waited {:?} for ranks {missing:?}, which never arrived",
                    self.rank, self.timeout
                );
                round.broken = Some(why.clone());
                self.shared.cv.notify_all();
                return Err(Error::Collective(why));
            }
            round = self.shared.cv.wait_timeout(round, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

impl Drop for LocalGroup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut round = self.lock();
            round
                .broken
                .get_or_insert_with(|| format!("rank {} left the group (its thread panicked)", self.rank));
            self.shared.cv.notify_all();
        }
    }
}

#[cfg(feature = "mpi")]
pub use mpi_impl::Mpi;

#[cfg(feature = "mpi")]
mod mpi_impl {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use mpi::datatype::PartitionMut;
    use mpi::topology::{Communicator, SimpleCommunicator};
    use mpi::traits::CommunicatorCollectives;

    use super::Collective;
    use crate::error::{Error, Result};

    /// The ranks of an MPI job (`mpirun -np P`): MPI's world communicator, over the `mpi`
    /// crate (rsmpi). MPI is initialised by [`Mpi::init`] and finalised when the value is
    /// dropped; a rank that dies makes `mpirun` end the others. Every exchange is a
    /// bounded wait: a watchdog thread ends the whole job (MPI_Abort, after removing this
    /// process's temporary output files) when a rank waits longer than the timeout for
    /// the others — a rank stuck in a driver cannot hang the job.
    pub struct Mpi {
        world: SimpleCommunicator,
        watchdog: Arc<Watchdog>,
        timeout: Duration,
        thread: Option<std::thread::JoinHandle<()>>,
        _universe: mpi::environment::Universe,
    }

    /// The deadline of the exchange in progress (ms since `start`; 0: none) and the stop
    /// flag of the watchdog thread.
    struct Watchdog {
        start: Instant,
        deadline_ms: AtomicU64,
        stop: AtomicBool,
    }

    impl std::fmt::Debug for Mpi {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Mpi(rank {} of {})", self.rank(), self.size())
        }
    }

    impl Mpi {
        /// Initialises MPI (once a process; a process started without `mpirun` is a job
        /// of one rank), every exchange bounded by ten minutes.
        pub fn init() -> Result<Self> {
            Self::init_with_timeout(Duration::from_secs(600))
        }

        /// As [`init`](Self::init), with exchanges bounded by `timeout`.
        pub fn init_with_timeout(timeout: Duration) -> Result<Self> {
            // The watchdog calls MPI_Abort from its own thread.
            let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Multiple)
                .ok_or_else(|| Error::Collective("MPI is already initialised in this process".into()))?;
            let world = universe.world();
            let rank = world.rank();
            let watchdog = Arc::new(Watchdog {
                start: Instant::now(),
                deadline_ms: AtomicU64::new(0),
                stop: AtomicBool::new(false),
            });
            let w = Arc::clone(&watchdog);
            let thread = std::thread::spawn(move || {
                while !w.stop.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(50));
                    let d = w.deadline_ms.load(Ordering::Acquire);
                    if d != 0 && w.start.elapsed().as_millis() as u64 > d {
                        eprintln!(
                            "error: collective: rank {rank} waited {timeout:?} for the other ranks of the job; \
                             ending every rank"
                        );
                        crate::npy::remove_live_temps();
                        SimpleCommunicator::world().abort(3);
                    }
                }
            });
            Ok(Mpi { world, watchdog, timeout, thread: Some(thread), _universe: universe })
        }

        /// Ends every rank of the job at once with `code` (MPI_Abort).
        pub fn abort(&self, code: i32) -> ! {
            self.world.abort(code)
        }
    }

    impl Drop for Mpi {
        fn drop(&mut self) {
            self.watchdog.stop.store(true, Ordering::Release);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    impl Collective for Mpi {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }
        fn size(&self) -> usize {
            self.world.size() as usize
        }
        fn all_gather(&self, mine: &[u64]) -> Result<Vec<Vec<u64>>> {
            let w = &self.watchdog;
            let deadline = w.start.elapsed() + self.timeout;
            w.deadline_ms.store((deadline.as_millis() as u64).max(1), Ordering::Release);
            let out = self.gather(mine);
            w.deadline_ms.store(0, Ordering::Release);
            out
        }
    }

    impl Mpi {
        /// The all-gather itself: the counts, then the words.
        fn gather(&self, mine: &[u64]) -> Result<Vec<Vec<u64>>> {
            let size = self.size();
            let mut counts = vec![0u64; size];
            self.world.all_gather_into(&(mine.len() as u64), &mut counts[..]);
            let total: u64 = counts.iter().sum();
            let too_large = || Error::TooLarge {
                what: "one MPI all-gather".into(),
                needed: total * 8,
                limit: (i32::MAX as u64) * 8,
                hint: "MPI counts are 32-bit: shard fewer rows a call".into(),
            };
            if total > i32::MAX as u64 {
                return Err(too_large());
            }
            let c: Vec<i32> = counts.iter().map(|&n| n as i32).collect();
            let displs: Vec<i32> =
                c.iter().scan(0, |acc, &n| Some(std::mem::replace(acc, *acc + n))).collect();
            let mut buf = vec![0u64; total as usize];
            {
                let mut part = PartitionMut::new(&mut buf[..], &c[..], &displs[..]);
                self.world.all_gather_varcount_into(mine, &mut part);
            }
            Ok(c.iter().zip(&displs).map(|(&n, &d)| buf[d as usize..(d + n) as usize].to_vec()).collect())
        }
    }
}
