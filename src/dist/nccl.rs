//! NCCL through cudarc (loaded at run time like libcuda): the GPU trainer's process group.
//!
//! Rank 0 makes the NCCL unique id and hands it to the others over the TCP rendezvous group
//! ([`super::tcp::TcpGroup`], which also carries the small byte broadcasts). Every NCCL call is
//! queued on the device's own stream, so it is ordered with the kernels and copies around it.
//! Device buffers are reduced where they are ([`Collective::all_reduce_device`]); host slices
//! (dense embeddings for cross-device negatives, head gradients) are staged through one device
//! buffer per call.

use super::tcp::TcpGroup;
use super::Collective;
use crate::device::launch::{KDType, KernelDevice};
use crate::engine::{DBuf, Gpu};
use crate::error::{Error, Result};
use cudarc::nccl::{result, sys};
use std::sync::Arc;

/// One rank of an NCCL communicator on one GPU.
pub struct NcclGroup {
    tcp: TcpGroup,
    comm: sys::ncclComm_t,
    stream: u64,
    dev: Arc<Gpu>,
}

// SAFETY: the communicator is used by one thread at a time (the owning `Group` holds it behind a
// mutex); NCCL allows a communicator to move between threads.
unsafe impl Send for NcclGroup {}

fn nccl_err(what: &str) -> impl FnOnce(result::NcclError) -> Error + '_ {
    move |e| Error::Dist(format!("NCCL {what} failed: {:?}", e.0))
}

impl NcclGroup {
    /// Create the communicator of `tcp`'s ranks on `dev` (this rank's GPU).
    pub fn new(mut tcp: TcpGroup, dev: Arc<Gpu>) -> Result<NcclGroup> {
        // SAFETY: only probes whether the shared library can be opened.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::Dist(
                "NCCL could not be loaded (libnccl.so.2 not found): install NCCL (for example \
                 the nvidia-nccl-cu13 wheel, with its lib/ on LD_LIBRARY_PATH) or train on one GPU"
                    .into(),
            ));
        }
        let stream = dev.cuda_stream().ok_or_else(|| {
            Error::Dist(format!(
                "NCCL needs a CUDA device; this rank runs on {}",
                dev.name()
            ))
        })?;
        let (rank, world) = (tcp.rank(), tcp.world());
        let mut bytes = if rank == 0 {
            let id = result::get_uniqueid().map_err(nccl_err("get_unique_id"))?;
            id.internal.iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        tcp.broadcast(&mut bytes)?;
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        if bytes.len() != id.internal.len() {
            return Err(Error::Dist(format!(
                "the NCCL id from rank 0 has {} bytes, not 128",
                bytes.len()
            )));
        }
        for (d, s) in id.internal.iter_mut().zip(&bytes) {
            *d = *s as _;
        }
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: comm points to writable storage for one communicator; the id is rank 0's.
        unsafe { result::comm_init_rank(comm.as_mut_ptr(), world as i32, id, rank as i32) }
            .map_err(nccl_err("comm_init_rank"))?;
        // SAFETY: initialised by the successful call above.
        let comm = unsafe { comm.assume_init() };
        Ok(NcclGroup {
            tcp,
            comm,
            stream,
            dev,
        })
    }

    /// Sum `n` f32 at `ptr` over the ranks, in place, on the stream.
    ///
    /// # Safety
    /// `ptr` must address `n` f32 of this group's device.
    unsafe fn reduce_in_place(&self, ptr: u64, n: usize) -> Result<()> {
        result::all_reduce(
            ptr as *const _,
            ptr as *mut _,
            n,
            sys::ncclDataType_t::ncclFloat32,
            sys::ncclRedOp_t::ncclSum,
            self.comm,
            self.stream as sys::cudaStream_t,
        )
        .map(|_| ())
        .map_err(nccl_err("all_reduce"))
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        // SAFETY: the communicator was created by comm_init_rank and is destroyed once.
        let _ = unsafe { result::comm_destroy(self.comm) };
    }
}

impl Collective for NcclGroup {
    fn rank(&self) -> usize {
        self.tcp.rank()
    }

    fn world(&self) -> usize {
        self.tcp.world()
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        let d = DBuf::from_f32(&*self.dev, buf, KDType::F32)?;
        // SAFETY: d holds buf.len() f32 on this device.
        unsafe { self.reduce_in_place(d.ptr().0, buf.len())? };
        buf.copy_from_slice(&d.to_f32(&*self.dev)?);
        Ok(())
    }

    fn all_gather(&mut self, local: &[f32]) -> Result<Vec<f32>> {
        let n = local.len();
        let send = DBuf::from_f32(&*self.dev, local, KDType::F32)?;
        let recv = DBuf::uninit(&*self.dev, n * self.world(), KDType::F32)?;
        // SAFETY: send holds n f32, recv n · world f32, both on this device.
        unsafe {
            result::all_gather(
                send.ptr().0 as *const _,
                recv.ptr().0 as *mut _,
                n,
                sys::ncclDataType_t::ncclFloat32,
                self.comm,
                self.stream as sys::cudaStream_t,
            )
        }
        .map_err(nccl_err("all_gather"))?;
        recv.to_f32(&*self.dev)
    }

    fn broadcast(&mut self, bytes: &mut Vec<u8>) -> Result<()> {
        self.tcp.broadcast(bytes)
    }

    fn all_reduce_device(&mut self, dev: &dyn KernelDevice, bufs: &[DBuf]) -> Result<()> {
        if dev.cuda_stream() != Some(self.stream) {
            return Err(Error::Dist(
                "all_reduce_device: the buffers live on another device than the NCCL group's"
                    .into(),
            ));
        }
        if let Some(b) = bufs.iter().find(|b| b.dtype() != KDType::F32) {
            return Err(Error::Dist(format!(
                "all_reduce_device: {b:?} is not f32 (gradients are accumulated in f32)"
            )));
        }
        result::group_start().map_err(nccl_err("group_start"))?;
        for b in bufs {
            // SAFETY: b holds b.len() f32 on this device (checked above).
            unsafe { self.reduce_in_place(b.ptr().0, b.len())? };
        }
        result::group_end().map_err(nccl_err("group_end"))?;
        Ok(())
    }
}
