//! The caching allocator: device buffers come from size-bucketed free lists and go back to them
//! when their `DevBuf` is dropped, so a training step or a selftest run does not pay cuMemAlloc /
//! cuMemFree (which synchronise the device) per tensor.
//!
//! Reuse is stream-ordered: every launch, copy and cuBLAS call of a `CudaDevice` goes to its one
//! stream, so a block handed out again while kernels that used it are still queued is only
//! touched by work queued after them. (A second stream would need events per block.)

use super::driver_error;
use crate::device::launch::{DevBuf, DevPtr};
use crate::error::{Error, Result};
use cudarc::driver::{result, sys, CudaContext, CudaStream};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Smallest block: cudaMalloc's own alignment is 256 bytes; 512 keeps tiny buffers in one bucket.
const MIN_BLOCK: usize = 512;
/// Above this, blocks are rounded to 2 MiB (the driver's large-page granularity) instead of to
/// a power of two, so a 600 MiB activation does not take 1 GiB.
const LARGE: usize = 1 << 20;
const LARGE_STEP: usize = 2 << 20;

/// The bucket (block size) a request of `bytes` is served from.
pub fn bucket(bytes: usize) -> usize {
    if bytes <= MIN_BLOCK {
        MIN_BLOCK
    } else if bytes <= LARGE {
        bytes.next_power_of_two()
    } else {
        bytes.div_ceil(LARGE_STEP) * LARGE_STEP
    }
}

/// Counters of the allocator (bytes are block sizes, not requested sizes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes handed out and not yet returned.
    pub live_bytes: usize,
    /// Bytes held in the free lists.
    pub cached_bytes: usize,
    /// Highest `live_bytes + cached_bytes` seen (what the driver has given us at most).
    pub peak_bytes: usize,
    /// Highest `live_bytes` since the pool began or since the last `reset_peak_live`.
    pub peak_live_bytes: usize,
    /// cuMemAlloc calls.
    pub driver_allocs: usize,
    /// Requests served from a free list.
    pub reuses: usize,
}

#[derive(Default)]
struct PoolState {
    free: BTreeMap<usize, Vec<sys::CUdeviceptr>>,
    stats: PoolStats,
}

/// Size-bucketed free lists of device blocks on one context and stream.
pub struct CachingAllocator {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    state: Mutex<PoolState>,
}

/// Owns one block while a `DevBuf` lives; returns it to the free list on drop.
struct Block {
    pool: Arc<CachingAllocator>,
    ptr: sys::CUdeviceptr,
    size: usize,
}

impl Drop for Block {
    fn drop(&mut self) {
        let mut st = self.pool.lock();
        st.free.entry(self.size).or_default().push(self.ptr);
        st.stats.live_bytes -= self.size;
        st.stats.cached_bytes += self.size;
    }
}

impl CachingAllocator {
    pub fn new(ctx: Arc<CudaContext>, stream: Arc<CudaStream>) -> Arc<CachingAllocator> {
        Arc::new(CachingAllocator {
            ctx,
            stream,
            state: Mutex::new(PoolState::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // A panic while holding the lock leaves the lists consistent (every update is one push
        // or pop plus counters), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A block of at least `bytes` (contents undefined), as a `DevBuf` of `bytes`.
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<DevBuf> {
        let size = bucket(bytes);
        let reused = {
            let mut st = self.lock();
            let ptr = st.free.get_mut(&size).and_then(Vec::pop);
            if ptr.is_some() {
                st.stats.cached_bytes -= size;
                st.stats.live_bytes += size;
                st.stats.peak_live_bytes = st.stats.peak_live_bytes.max(st.stats.live_bytes);
                st.stats.reuses += 1;
            }
            ptr
        };
        let ptr = match reused {
            Some(p) => p,
            None => self.driver_alloc(size)?,
        };
        let block = Block {
            pool: Arc::clone(self),
            ptr,
            size,
        };
        Ok(DevBuf::new(DevPtr(ptr), bytes, Box::new(block)))
    }

    /// cuMemAlloc, retried once after returning the free lists to the driver when it is out of
    /// memory (the cached blocks may be of the wrong sizes).
    fn driver_alloc(&self, size: usize) -> Result<sys::CUdeviceptr> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver_error("cuCtxSetCurrent", e))?;
        // SAFETY: the context is current on this thread; the block is owned by a `Block` that
        // frees it (through the free list and `release_cached`/drop) exactly once.
        let first = unsafe { result::malloc_sync(size) };
        let ptr = match first {
            Ok(p) => p,
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
                self.release_cached()?;
                // SAFETY: as above.
                unsafe { result::malloc_sync(size) }.map_err(|e| {
                    if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                        let st = self.stats();
                        Error::OutOfMemory {
                            device: "cuda".into(),
                            requested: size,
                            detail: format!(
                                "cuMemAlloc failed after releasing the cache; {} bytes live, \
                                 peak {}",
                                st.live_bytes, st.peak_bytes
                            ),
                        }
                    } else {
                        driver_error(&format!("cuMemAlloc of {size} bytes (cache released)"), e)
                    }
                })?
            }
            Err(e) => return Err(driver_error(&format!("cuMemAlloc of {size} bytes"), e)),
        };
        let mut st = self.lock();
        st.stats.driver_allocs += 1;
        st.stats.live_bytes += size;
        st.stats.peak_live_bytes = st.stats.peak_live_bytes.max(st.stats.live_bytes);
        st.stats.peak_bytes = st
            .stats
            .peak_bytes
            .max(st.stats.live_bytes + st.stats.cached_bytes);
        Ok(ptr)
    }

    /// Give every cached (free) block back to the driver, after the stream has finished with
    /// them.
    pub fn release_cached(&self) -> Result<()> {
        let blocks: Vec<sys::CUdeviceptr> = {
            let mut st = self.lock();
            st.stats.cached_bytes = 0;
            std::mem::take(&mut st.free)
                .into_values()
                .flatten()
                .collect()
        };
        if blocks.is_empty() {
            return Ok(());
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver_error("cuCtxSetCurrent", e))?;
        self.stream
            .synchronize()
            .map_err(|e| driver_error("stream synchronize before cuMemFree", e))?;
        for p in blocks {
            // SAFETY: p came from cuMemAlloc on this context, is in no free list any more and no
            // live `Block` owns it; the stream has finished every use (synchronised above).
            unsafe { result::free_sync(p) }.map_err(|e| driver_error("cuMemFree", e))?;
        }
        Ok(())
    }

    /// Restart `peak_live_bytes` from the bytes live now.
    pub fn reset_peak_live(&self) {
        let mut st = self.lock();
        st.stats.peak_live_bytes = st.stats.live_bytes;
    }

    pub fn stats(&self) -> PoolStats {
        self.lock().stats
    }
}

impl Drop for CachingAllocator {
    fn drop(&mut self) {
        // Runs when the device and every buffer are gone; errors cannot be reported from here
        // (a failed free at exit leaks device memory the driver reclaims with the context).
        let _ = self.release_cached();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_round_up_and_stay_close_for_large_sizes() {
        assert_eq!(bucket(0), 512);
        assert_eq!(bucket(1), 512);
        assert_eq!(bucket(512), 512);
        assert_eq!(bucket(513), 1024);
        assert_eq!(bucket(3000), 4096);
        assert_eq!(bucket(1 << 20), 1 << 20);
        assert_eq!(bucket((1 << 20) + 1), 2 << 20);
        assert_eq!(bucket(600 << 20), 600 << 20);
        assert_eq!(bucket((600 << 20) + 1), 602 << 20);
        for n in [1usize, 700, 5000, 1 << 19, 3 << 20, (7 << 20) + 3] {
            assert!(bucket(n) >= n);
            assert_eq!(
                bucket(bucket(n)),
                bucket(n),
                "a block serves its own bucket"
            );
        }
    }
}
