//! What the host drivers share: the out-of-memory retry of a call's buffers, and the
//! ring of readback slots that keeps a bounded number of chunks in flight (while the GPU
//! computes chunk k, the host uploads chunk k+1 and copies out the results of chunk k−1).

use std::collections::VecDeque;

use crate::error::{Error, Result};

use super::buffers::{Recorder, Slot};
use super::context::{GpuContext, MapRequest};
use super::plan::PlanLimits;
use super::workspace::Workspace;

/// Parameter blocks one submission may use (the size of every driver's params buffer).
pub(crate) const MAX_PARAM_BLOCKS: u64 = 16;
/// Out-of-memory retries halve the budget down to this, then give up.
const MIN_RETRY_BUDGET: u64 = 1 << 20;

impl GpuContext {
    /// One call on the context's workspace: `plan` it within the context's limits,
    /// `prepare` the buffers in an error scope of their own — an out-of-memory there, known
    /// before anything is streamed (or written over in-place logits), is retried with half
    /// the budget, so smaller chunks — then run `work` in an error scope. Any error after
    /// the plan drops the workspace's buffers: they may still be in flight or mapped.
    pub(crate) fn planned<P, R>(
        &self,
        mut plan: impl FnMut(&PlanLimits) -> Result<P>,
        mut prepare: impl FnMut(&mut Workspace, &P),
        work: impl FnOnce(&Workspace, P) -> Result<R>,
    ) -> Result<R> {
        let mut limits = self.plan_limits();
        let mut ws = self.workspace.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let planned = plan(&limits)?;
            let prepared = self.scoped(|| {
                self.take_injected_oom()?;
                prepare(&mut ws, &planned);
                Ok(())
            });
            match prepared {
                Err(Error::OutOfMemory(_)) if limits.budget / 2 >= MIN_RETRY_BUDGET => {
                    ws.release();
                    limits.budget /= 2;
                }
                Err(e) => {
                    ws.release();
                    return Err(e);
                }
                Ok(()) => return self.scoped(|| work(&ws, planned)).inspect_err(|_| ws.release()),
            }
        }
    }
}

/// One submission in flight: its slot, its readback request, and what the caller said
/// the slot's bytes hold.
struct Pending<T> {
    slot: usize,
    submission: wgpu::SubmissionIndex,
    map: Option<MapRequest>,
    what: T,
}

/// Submissions in flight over a ring of readback slots, at most `depth` at once. Each
/// carries a `T` saying what its readback holds; when it is done, the bytes and the `T`
/// go to the caller's `out`. Buffers other than the readback are shared by every chunk:
/// `queue.write_buffer` and the parameter upload land between submissions in queue
/// order, so a chunk's inputs may be written while the one before computes.
pub(crate) struct Ring<'a, T> {
    ctx: &'a GpuContext,
    readback: &'a [Slot],
    params: &'a wgpu::Buffer,
    depth: usize,
    pending: VecDeque<Pending<T>>,
    submitted: usize,
}

impl<'a, T> Ring<'a, T> {
    /// A ring over the first `depth` of `readback`, recording into `params`.
    pub fn new(ctx: &'a GpuContext, readback: &'a [Slot], params: &'a wgpu::Buffer, depth: usize) -> Self {
        let depth = depth.max(1);
        assert!(readback.len() >= depth, "{} readback slots for a ring of {depth}", readback.len());
        Self { ctx, readback, params, depth, pending: VecDeque::new(), submitted: 0 }
    }

    /// The slot of the next submission: first the oldest submissions are finished until
    /// one is free, their readback handed to `out`.
    pub fn next_slot(&mut self, mut out: impl FnMut(T, &[u8])) -> Result<usize> {
        while self.pending.len() >= self.depth {
            let p = self.pending.pop_front().expect("non-empty");
            self.finish(p, &mut out)?;
        }
        Ok(self.submitted % self.depth)
    }

    /// The readback buffer of `slot`.
    pub fn readback(&self, slot: usize) -> &'a wgpu::Buffer {
        self.readback[slot].get()
    }

    /// Submits `rec`, which copies into the readback of `slot` (from [`Ring::next_slot`]);
    /// its first `map` bytes (none for 0) go to `out` with `what` when it is done.
    pub fn submit(&mut self, rec: Recorder<'_>, slot: usize, map: u64, what: T) {
        debug_assert_eq!(slot, self.submitted % self.depth, "slots are taken in turn");
        debug_assert!(rec.blocks() <= MAX_PARAM_BLOCKS);
        let submission = rec.submit(&self.ctx.queue, self.params);
        let map = (map > 0).then(|| self.ctx.request_map(self.readback(slot), map));
        self.pending.push_back(Pending { slot, submission, map, what });
        self.submitted += 1;
    }

    /// Finishes every submission in flight.
    pub fn drain(&mut self, mut out: impl FnMut(T, &[u8])) -> Result<()> {
        while let Some(p) = self.pending.pop_front() {
            self.finish(p, &mut out)?;
        }
        Ok(())
    }

    /// Waits for a submission and hands its readback to `out`.
    fn finish(&self, p: Pending<T>, out: &mut impl FnMut(T, &[u8])) -> Result<()> {
        let Pending { slot, submission, map, what } = p;
        match map {
            None => self.ctx.wait(Some(submission)),
            Some(map) => {
                self.ctx.finish_map(self.readback(slot), map, Some(submission), |bytes| out(what, bytes))
            }
        }
    }
}
