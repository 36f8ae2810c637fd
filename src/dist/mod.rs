//! Data-parallel training over several processes (one per GPU, or several CPU processes): the
//! collectives the M3 trainer needs (issue 5 item 6, SPEC §4.5 / §5.2 / decision §10.9).
//!
//! * [`Collective`]: all-reduce (sum), all-gather and a broadcast from rank 0.
//! * [`Single`]: the world of one (every collective is the identity).
//! * [`tcp::TcpGroup`]: a star over TCP sockets (rank 0 gathers, reduces in rank order and sends
//!   the result back), so every rank receives bit-identical sums. It needs nothing but the
//!   network, runs the CPU trainer across processes, and carries the NCCL unique id.
//! * `nccl::NcclGroup` (feature `cuda`): NCCL through cudarc for the GPU trainer; its rendezvous is
//!   a [`tcp::TcpGroup`].
//!
//! Processes find each other through torchrun-style environment variables ([`DistEnv`]):
//! `WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`.

pub mod tcp;

#[cfg(feature = "cuda")]
pub mod nccl;

use crate::device::launch::KernelDevice;
use crate::engine::DBuf;
use crate::error::{Error, Result};
use std::sync::{Arc, Mutex};

/// The collectives of a process group. Every rank must call the same collectives in the same
/// order with the same lengths; implementations check what they can and return
/// [`Error::Dist`] on a mismatch or a lost peer instead of hanging.
pub trait Collective: Send {
    /// This process's index in the group.
    fn rank(&self) -> usize;
    /// Number of processes.
    fn world(&self) -> usize;
    /// Element-wise sum over all ranks, in place; every rank receives the same values.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()>;
    /// The concatenation, in rank order, of every rank's `local` (all of the same length).
    fn all_gather(&mut self, local: &[f32]) -> Result<Vec<f32>>;
    /// Rank 0's `bytes` on every rank.
    fn broadcast(&mut self, bytes: &mut Vec<u8>) -> Result<()>;
    /// Element-wise sum over all ranks of f32 device buffers, in place. The default reads them
    /// back, reduces on the host and writes them again; NCCL reduces them where they are.
    fn all_reduce_device(&mut self, dev: &dyn KernelDevice, bufs: &[DBuf]) -> Result<()> {
        for b in bufs {
            let mut v = b.to_f32(dev)?;
            self.all_reduce_sum(&mut v)?;
            b.write_f32(dev, &v)?;
        }
        Ok(())
    }
}

/// The group of one process.
#[derive(Clone, Copy, Debug, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_gather(&mut self, local: &[f32]) -> Result<Vec<f32>> {
        Ok(local.to_vec())
    }
    fn broadcast(&mut self, _bytes: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
    fn all_reduce_device(&mut self, _dev: &dyn KernelDevice, _bufs: &[DBuf]) -> Result<()> {
        Ok(())
    }
}

/// A shareable handle on a process group (the trainer, its batches and the device path all hold
/// one). Rank and world are cached so that asking for them never takes the lock.
#[derive(Clone)]
pub struct Group {
    inner: Arc<Mutex<Box<dyn Collective>>>,
    rank: usize,
    world: usize,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Group(rank {} of {})", self.rank, self.world)
    }
}

impl Default for Group {
    fn default() -> Self {
        Group::single()
    }
}

impl Group {
    /// Wrap a collective.
    pub fn new(c: impl Collective + 'static) -> Group {
        let (rank, world) = (c.rank(), c.world());
        Group {
            inner: Arc::new(Mutex::new(Box::new(c))),
            rank,
            world,
        }
    }

    /// The world of one.
    pub fn single() -> Group {
        Group::new(Single)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Rank 0 (writes checkpoints, metrics and the progress bar).
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Box<dyn Collective>>> {
        self.inner
            .lock()
            .map_err(|_| Error::Dist("the process group's lock was poisoned".into()))
    }

    /// See [`Collective::all_reduce_sum`].
    pub fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        self.lock()?.all_reduce_sum(buf)
    }

    /// See [`Collective::all_gather`].
    pub fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>> {
        if self.world == 1 {
            return Ok(local.to_vec());
        }
        self.lock()?.all_gather(local)
    }

    /// See [`Collective::broadcast`].
    pub fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        self.lock()?.broadcast(bytes)
    }

    /// See [`Collective::all_reduce_device`].
    pub fn all_reduce_device(&self, dev: &dyn KernelDevice, bufs: &[DBuf]) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        self.lock()?.all_reduce_device(dev, bufs)
    }

    /// The rows of every rank's [rows, cols] `local` tensor stacked in rank order:
    /// [world · rows, cols].
    pub fn all_gather_rows(&self, local: &crate::Tensor) -> Result<crate::Tensor> {
        let mut dims = local.dims().to_vec();
        let all = self.all_gather(local.f32s()?)?;
        dims[0] *= self.world;
        crate::Tensor::from_vec(all, &dims)
    }

    /// Average gradients over the group (decision §10.9: each rank's gradient becomes
    /// (1/W) Σ_r g_r): the present gradients are packed into one buffer, summed and scaled.
    /// Every rank must have gradients for the same parameters (they share one configuration).
    pub fn average_grads(&self, grads: &mut [Option<crate::Tensor>]) -> Result<()> {
        self.average_grads_from(grads, 0)
    }

    /// [`Group::average_grads`] where the first `summed` gradients were already summed over the
    /// group (on the device, by [`Group::all_reduce_device`]): only the rest are reduced here,
    /// all are scaled by 1/W.
    pub fn average_grads_from(
        &self,
        grads: &mut [Option<crate::Tensor>],
        summed: usize,
    ) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let summed = summed.min(grads.len());
        let mut flat = Vec::new();
        for g in grads[summed..].iter().flatten() {
            flat.extend_from_slice(g.f32s()?);
        }
        self.all_reduce_sum(&mut flat)?;
        let inv = 1.0 / self.world as f32;
        let mut at = 0;
        for (i, g) in grads.iter_mut().enumerate() {
            let Some(g) = g else { continue };
            let v: Vec<f32> = if i < summed {
                g.f32s()?.iter().map(|&x| x * inv).collect()
            } else {
                let n = g.numel();
                at += n;
                flat[at - n..at].iter().map(|&x| x * inv).collect()
            };
            *g = crate::Tensor::from_vec(v, g.dims())?;
        }
        Ok(())
    }

    /// Check that every rank holds the same parameters (they receive identical averaged
    /// gradients and run the same optimizer, so they never should differ): every rank's
    /// fingerprint is gathered and compared on every rank, so that all stop together (rank 0
    /// must not write a checkpoint another rank refused). A rank that differs from rank 0 names
    /// itself; the others name it.
    pub fn check_in_sync(&self, params: &[crate::Tensor], what: &str) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for p in params {
            for &x in p.f32s()? {
                h = (h ^ x.to_bits() as u64).wrapping_mul(0x0100_0000_01b3);
            }
        }
        // As four 16-bit pieces, each exact in an f32.
        let pieces: Vec<f32> = (0..4).map(|i| ((h >> (16 * i)) & 0xffff) as f32).collect();
        let all = self.all_gather(&pieces)?;
        let prints: Vec<u64> = all
            .chunks_exact(4)
            .map(|c| (0..4).fold(0u64, |acc, i| acc | ((c[i] as u64) << (16 * i))))
            .collect();
        let differ: Vec<usize> = (1..prints.len())
            .filter(|&r| prints[r] != prints[0])
            .collect();
        if differ.is_empty() {
            return Ok(());
        }
        let who = if differ.contains(&self.rank) {
            format!("rank {} holds", self.rank)
        } else {
            format!("rank {}: ranks {differ:?} hold", self.rank)
        };
        Err(Error::Dist(format!(
            "{who} different parameters from rank 0 {what} (fingerprints {}): the ranks \
             were started from different models or flags",
            prints
                .iter()
                .map(|p| format!("{p:016x}"))
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }
}

/// The torchrun-style environment of a launched process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world: usize,
    /// GPU ordinal of this process on its machine (`LOCAL_RANK`, default = `RANK`).
    pub local_rank: usize,
    /// Rank 0's address, `MASTER_ADDR:MASTER_PORT`.
    pub master: String,
}

impl DistEnv {
    /// Read `WORLD_SIZE` (absent = 1: not launched as a group), `RANK`, `LOCAL_RANK`,
    /// `MASTER_ADDR` (default 127.0.0.1) and `MASTER_PORT` (default 29500). Errors name the variable.
    pub fn from_env() -> Result<Option<DistEnv>> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// [`DistEnv::from_env`] over any variable lookup (tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<DistEnv>> {
        let num = |k: &str| -> Result<Option<usize>> {
            get(k)
                .map(|v| {
                    v.trim().parse::<usize>().map_err(|_| {
                        Error::Dist(format!("{k}={v:?} is not a non-negative integer"))
                    })
                })
                .transpose()
        };
        let world = num("WORLD_SIZE")?.unwrap_or(1);
        if world == 0 {
            return Err(Error::Dist(
                "WORLD_SIZE=0: need at least one process".into(),
            ));
        }
        tcp::check_world(world)?;
        if world == 1 {
            // A process launched as rank 1 of a group whose WORLD_SIZE was lost would train
            // alone and write its own model.
            if let Some(rank) = num("RANK")?.filter(|&r| r > 0) {
                return Err(Error::Dist(format!(
                    "RANK={rank} but WORLD_SIZE is {}: a group needs WORLD_SIZE > RANK",
                    if get("WORLD_SIZE").is_some() {
                        "1"
                    } else {
                        "not set"
                    }
                )));
            }
            return Ok(None);
        }
        let rank = num("RANK")?
            .ok_or_else(|| Error::Dist(format!("WORLD_SIZE={world} but RANK is not set")))?;
        if rank >= world {
            return Err(Error::Dist(format!(
                "RANK={rank} is not below WORLD_SIZE={world}"
            )));
        }
        let local_rank = num("LOCAL_RANK")?.unwrap_or(rank);
        let addr = get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let port = num("MASTER_PORT")?.unwrap_or(29500);
        if port == 0 || port > 65535 {
            return Err(Error::Dist(format!("MASTER_PORT={port} is not a TCP port")));
        }
        Ok(Some(DistEnv {
            rank,
            world,
            local_rank,
            master: format!("{addr}:{port}"),
        }))
    }

    /// Join the TCP group this environment describes (rank 0 listens, the others connect).
    pub fn connect(&self) -> Result<tcp::TcpGroup> {
        if self.rank == 0 {
            let listener = std::net::TcpListener::bind(&self.master).map_err(|e| {
                Error::Dist(format!(
                    "rank 0 cannot listen on {} (MASTER_ADDR:MASTER_PORT): {e}",
                    self.master
                ))
            })?;
            tcp::TcpGroup::host(listener, self.world)
        } else {
            tcp::TcpGroup::join(&self.master, self.rank, self.world)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<Option<DistEnv>> {
        let m: std::collections::HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        DistEnv::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn env_parsing() {
        assert_eq!(env(&[]).unwrap(), None);
        assert_eq!(env(&[("WORLD_SIZE", "1"), ("RANK", "0")]).unwrap(), None);
        let e = env(&[("WORLD_SIZE", "4"), ("RANK", "2"), ("MASTER_PORT", "1234")])
            .unwrap()
            .unwrap();
        assert_eq!((e.rank, e.world, e.local_rank), (2, 4, 2));
        assert_eq!(e.master, "127.0.0.1:1234");
        for (vars, needle) in [
            (vec![("WORLD_SIZE", "2")], "RANK is not set"),
            (vec![("WORLD_SIZE", "2"), ("RANK", "2")], "not below"),
            (vec![("WORLD_SIZE", "x")], "WORLD_SIZE=\"x\""),
            (vec![("WORLD_SIZE", "0")], "WORLD_SIZE=0"),
            (
                vec![("WORLD_SIZE", "18446744073709551615"), ("RANK", "0")],
                "a group has 1 to 65536 processes",
            ),
            (
                vec![("WORLD_SIZE", "4294967298"), ("RANK", "0")],
                "a group has 1 to 65536 processes",
            ),
            (vec![("RANK", "1")], "RANK=1 but WORLD_SIZE is not set"),
            (
                vec![("WORLD_SIZE", "1"), ("RANK", "5")],
                "RANK=5 but WORLD_SIZE is 1",
            ),
            (
                vec![("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_PORT", "70000")],
                "not a TCP port",
            ),
        ] {
            let err = env(&vars).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn single_is_identity() {
        let g = Group::single();
        let mut v = vec![1.0, 2.0];
        g.all_reduce_sum(&mut v).unwrap();
        assert_eq!(v, [1.0, 2.0]);
        assert_eq!(g.all_gather(&v).unwrap(), [1.0, 2.0]);
        let mut grads = vec![
            Some(crate::Tensor::from_vec(vec![3.0], &[1]).unwrap()),
            None,
        ];
        g.average_grads(&mut grads).unwrap();
        assert_eq!(grads[0].as_ref().unwrap().f32s().unwrap(), [3.0]);
    }
}
