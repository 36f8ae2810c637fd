//! A process group over TCP: a star with rank 0 at the centre.
//!
//! Every collective sends each rank's payload to rank 0, which combines them in rank order
//! (sums start from rank 0's values and add rank 1, 2, ... in turn) and sends the result to every
//! peer, so all ranks hold bit-identical results. Each message carries the collective's kind and
//! sequence number: ranks that disagree on what they are doing get an error naming both sides
//! rather than a hang or mixed-up data. A lost peer (a process that stopped) is an error at the
//! next collective; a peer that stops answering is one after the read timeout
//! (`R3_DIST_TIMEOUT_S`, default 1800 s).

use super::Collective;
use crate::error::{Error, Result};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

const MAGIC: u32 = 0x5233_4447; // "R3DG"
const VERSION: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    AllReduce = 1,
    AllGather = 2,
    Broadcast = 3,
}

impl Op {
    fn name(b: u8) -> &'static str {
        match b {
            1 => "all_reduce",
            2 => "all_gather",
            3 => "broadcast",
            _ => "an unknown collective",
        }
    }
}

/// One member of a TCP process group.
pub struct TcpGroup {
    rank: usize,
    world: usize,
    /// Rank 0: the stream of peer r at index r - 1. Others: the stream to rank 0.
    peers: Vec<TcpStream>,
    seq: u64,
}

fn timeout_from_env() -> Duration {
    let s = std::env::var("R3_DIST_TIMEOUT_S")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1800);
    Duration::from_secs(s.max(1))
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::Dist(format!("{what}: {e}"))
}

fn read_u32s<const N: usize>(s: &mut TcpStream, what: &str) -> Result<[u32; N]> {
    let mut b = vec![0u8; 4 * N];
    s.read_exact(&mut b).map_err(io_err(what.to_string()))?;
    let mut out = [0u32; N];
    for (i, c) in b.chunks_exact(4).enumerate() {
        out[i] = u32::from_le_bytes(c.try_into().expect("4 bytes"));
    }
    Ok(out)
}

fn write_u32s(s: &mut TcpStream, v: &[u32], what: &str) -> Result<()> {
    let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    s.write_all(&b).map_err(io_err(what.to_string()))
}

impl TcpGroup {
    /// Rank 0: accept the `world - 1` peers on `listener` (each announces its rank).
    pub fn host(listener: TcpListener, world: usize) -> Result<TcpGroup> {
        let timeout = timeout_from_env();
        let mut slots: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
        listener
            .set_nonblocking(true)
            .map_err(io_err("rank 0: listener".into()))?;
        let start = Instant::now();
        let mut joined = 0;
        while joined < world - 1 {
            match listener.accept() {
                Ok((mut s, addr)) => {
                    s.set_nonblocking(false)
                        .map_err(io_err(format!("rank 0: peer {addr}")))?;
                    s.set_read_timeout(Some(timeout))
                        .map_err(io_err(format!("rank 0: peer {addr}")))?;
                    let [magic, version, rank, their_world] =
                        read_u32s::<4>(&mut s, &format!("rank 0: handshake from {addr}"))?;
                    if magic != MAGIC || version != VERSION {
                        return Err(Error::Dist(format!(
                            "rank 0: {addr} is not a retrom3 rank of this version (another \
                             program on MASTER_PORT?)"
                        )));
                    }
                    let rank = rank as usize;
                    if their_world as usize != world {
                        return Err(Error::Dist(format!(
                            "rank {rank} was started with WORLD_SIZE={their_world}, rank 0 with \
                             {world}"
                        )));
                    }
                    if rank == 0 || rank >= world || slots[rank - 1].is_some() {
                        return Err(Error::Dist(format!(
                            "rank 0: a second process claims rank {rank} (or it is out of \
                             range for WORLD_SIZE={world})"
                        )));
                    }
                    write_u32s(
                        &mut s,
                        &[MAGIC, 0],
                        &format!("rank 0: reply to rank {rank}"),
                    )?;
                    let _ = s.set_nodelay(true);
                    slots[rank - 1] = Some(s);
                    joined += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if start.elapsed() > timeout {
                        let missing: Vec<usize> =
                            (1..world).filter(|r| slots[r - 1].is_none()).collect();
                        return Err(Error::Dist(format!(
                            "rank 0: ranks {missing:?} did not join within {} s",
                            timeout.as_secs()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(Error::Dist(format!("rank 0: accept: {e}"))),
            }
        }
        Ok(TcpGroup {
            rank: 0,
            world,
            peers: slots.into_iter().map(|s| s.expect("all joined")).collect(),
            seq: 0,
        })
    }

    /// Rank `rank` > 0: connect to rank 0 at `addr` (retrying until the read timeout, since
    /// rank 0 may start later).
    pub fn join(addr: &str, rank: usize, world: usize) -> Result<TcpGroup> {
        if rank == 0 || rank >= world {
            return Err(Error::Dist(format!(
                "join: rank {rank} of {world} (rank 0 hosts the group)"
            )));
        }
        let timeout = timeout_from_env();
        let start = Instant::now();
        let mut s = loop {
            match TcpStream::connect(addr) {
                Ok(s) => break s,
                Err(e) => {
                    if start.elapsed() > timeout {
                        return Err(Error::Dist(format!(
                            "rank {rank}: cannot reach rank 0 at {addr} (MASTER_ADDR:MASTER_PORT) \
                             within {} s: {e}",
                            timeout.as_secs()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        s.set_read_timeout(Some(timeout))
            .map_err(io_err(format!("rank {rank}: socket")))?;
        let _ = s.set_nodelay(true);
        let what = format!("rank {rank}: handshake with rank 0 at {addr}");
        write_u32s(&mut s, &[MAGIC, VERSION, rank as u32, world as u32], &what)?;
        let [magic, _] = read_u32s::<2>(&mut s, &what)?;
        if magic != MAGIC {
            return Err(Error::Dist(format!("{what}: not a retrom3 rank 0")));
        }
        Ok(TcpGroup {
            rank,
            world,
            peers: vec![s],
            seq: 0,
        })
    }

    fn send(&mut self, to: usize, op: Op, payload: &[u8]) -> Result<()> {
        let idx = if self.rank == 0 { to - 1 } else { 0 };
        let mut head = Vec::with_capacity(17);
        head.push(op as u8);
        head.extend_from_slice(&self.seq.to_le_bytes());
        head.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        let rank = self.rank;
        let s = &mut self.peers[idx];
        let what = || format!("rank {rank}: sending {} to rank {to}", Op::name(op as u8));
        s.write_all(&head)
            .map_err(|e| Error::Dist(format!("{}: {e}", what())))?;
        s.write_all(payload)
            .map_err(|e| Error::Dist(format!("{}: {e}", what())))
    }

    fn recv(&mut self, from: usize, op: Op) -> Result<Vec<u8>> {
        let idx = if self.rank == 0 { from - 1 } else { 0 };
        let (rank, seq) = (self.rank, self.seq);
        let s = &mut self.peers[idx];
        let what = |e: std::io::Error| {
            let hint = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                " (that process stopped: see its own error)"
            } else {
                ""
            };
            Error::Dist(format!(
                "rank {rank}: waiting for rank {from} in {} #{seq}: {e}{hint}",
                Op::name(op as u8)
            ))
        };
        let mut head = [0u8; 17];
        s.read_exact(&mut head).map_err(what)?;
        let their_op = head[0];
        let their_seq = u64::from_le_bytes(head[1..9].try_into().expect("8 bytes"));
        let len = u64::from_le_bytes(head[9..17].try_into().expect("8 bytes")) as usize;
        if their_op != op as u8 || their_seq != seq {
            return Err(Error::Dist(format!(
                "rank {from} is in {} #{their_seq} while rank {rank} is in {} #{seq}: the ranks \
                 run different steps (different data, flags or model?)",
                Op::name(their_op),
                Op::name(op as u8)
            )));
        }
        let mut buf = vec![0u8; len];
        s.read_exact(&mut buf).map_err(what)?;
        Ok(buf)
    }

    /// Rank 0 combines the payloads of all ranks (its own first) into one, sent back to all.
    fn star(
        &mut self,
        op: Op,
        mine: &[u8],
        combine: impl Fn(&mut Vec<u8>, usize, &[u8]) -> Result<()>,
    ) -> Result<Vec<u8>> {
        self.seq += 1;
        if self.rank == 0 {
            let mut acc = mine.to_vec();
            for r in 1..self.world {
                let theirs = self.recv(r, op)?;
                combine(&mut acc, r, &theirs)?;
            }
            for r in 1..self.world {
                self.send(r, op, &acc)?;
            }
            Ok(acc)
        } else {
            self.send(0, op, mine)?;
            self.recv(0, op)
        }
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect()
}

impl Collective for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        let n = buf.len();
        let out = self.star(Op::AllReduce, &f32_bytes(buf), |acc, r, theirs| {
            if theirs.len() != acc.len() {
                return Err(Error::Dist(format!(
                    "all_reduce: rank {r} sent {} values, rank 0 has {n}",
                    theirs.len() / 4
                )));
            }
            let sum: Vec<f32> = bytes_f32(acc)
                .iter()
                .zip(bytes_f32(theirs))
                .map(|(a, b)| a + b)
                .collect();
            *acc = f32_bytes(&sum);
            Ok(())
        })?;
        if out.len() != 4 * n {
            return Err(Error::Dist(format!(
                "all_reduce: rank {} has {n} values, rank 0 sent back {}",
                self.rank,
                out.len() / 4
            )));
        }
        buf.copy_from_slice(&bytes_f32(&out));
        Ok(())
    }

    fn all_gather(&mut self, local: &[f32]) -> Result<Vec<f32>> {
        let n = local.len();
        let out = self.star(Op::AllGather, &f32_bytes(local), |acc, r, theirs| {
            if theirs.len() != 4 * n {
                return Err(Error::Dist(format!(
                    "all_gather: rank {r} sent {} values, rank 0 has {n}",
                    theirs.len() / 4
                )));
            }
            acc.extend_from_slice(theirs);
            Ok(())
        })?;
        if out.len() != 4 * n * self.world {
            return Err(Error::Dist(format!(
                "all_gather: rank {} has {n} values, the gathered total is {}",
                self.rank,
                out.len() / 4
            )));
        }
        Ok(bytes_f32(&out))
    }

    fn broadcast(&mut self, bytes: &mut Vec<u8>) -> Result<()> {
        self.seq += 1;
        if self.rank == 0 {
            for r in 1..self.world {
                self.send(r, Op::Broadcast, bytes)?;
            }
        } else {
            *bytes = self.recv(0, Op::Broadcast)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run `f(group)` on `world` threads joined over localhost.
    pub(crate) fn on_threads<T: Send + 'static>(
        world: usize,
        f: impl Fn(TcpGroup) -> T + Send + Sync + Clone + 'static,
    ) -> Vec<T> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let mut handles = Vec::new();
        for r in 1..world {
            let (f, addr) = (f.clone(), addr.clone());
            handles.push(std::thread::spawn(move || {
                f(TcpGroup::join(&addr, r, world).unwrap())
            }));
        }
        let g0 = TcpGroup::host(listener, world).unwrap();
        let mut out = vec![f(g0)];
        out.extend(handles.into_iter().map(|h| h.join().unwrap()));
        out
    }

    #[test]
    fn collectives_over_three_ranks() {
        let res = on_threads(3, |mut g| {
            let r = g.rank() as f32;
            let mut v = vec![r, 10.0 * r + 0.5, -r];
            g.all_reduce_sum(&mut v).unwrap();
            let gathered = g.all_gather(&[r, r + 100.0]).unwrap();
            let mut b = if g.rank() == 0 {
                b"hello".to_vec()
            } else {
                Vec::new()
            };
            g.broadcast(&mut b).unwrap();
            (v, gathered, b)
        });
        for (v, gathered, b) in res {
            assert_eq!(v, [3.0, 31.5, -3.0]);
            assert_eq!(gathered, [0.0, 100.0, 1.0, 101.0, 2.0, 102.0]);
            assert_eq!(b, b"hello");
        }
    }

    #[test]
    fn mismatched_collectives_are_errors() {
        let res = on_threads(2, |mut g| {
            if g.rank() == 0 {
                g.all_reduce_sum(&mut [1.0]).map(|_| ())
            } else {
                g.all_gather(&[1.0]).map(|_| ())
            }
        });
        let e = res[0].as_ref().unwrap_err().to_string();
        assert!(
            e.contains("rank 1 is in all_gather #1 while rank 0 is in all_reduce #1"),
            "{e}"
        );
        // Rank 1 then loses its peer: an error, not a hang.
        assert!(res[1].is_err());
    }

    #[test]
    fn lengths_must_agree() {
        let res = on_threads(2, |mut g| {
            let v = vec![1.0; 1 + g.rank()];
            g.all_gather(&v).map(|_| ())
        });
        let e = res[0].as_ref().unwrap_err().to_string();
        assert!(e.contains("rank 1 sent 2 values, rank 0 has 1"), "{e}");
    }

    #[test]
    fn a_stopped_peer_is_named() {
        let res = on_threads(2, |mut g| {
            if g.rank() == 1 {
                drop(g);
                return Ok(());
            }
            g.all_reduce_sum(&mut [1.0])
        });
        let e = res[0].as_ref().unwrap_err().to_string();
        assert!(e.contains("waiting for rank 1"), "{e}");
    }
}
