//! A process group over TCP: a star with rank 0 at the centre.
//!
//! Every collective sends each rank's payload to rank 0, which combines them in rank order
//! (sums start from rank 0's values and add rank 1, 2, ... in turn) and sends the result to every
//! peer, so all ranks hold bit-identical results. Each message carries the collective's kind and
//! sequence number: ranks that disagree on what they are doing get an error naming both sides
//! rather than a hang or mixed-up data. A lost peer (a process that stopped) is an error at the
//! next collective; a peer that stops answering or taking data is one after the timeout
//! (`R3_DIST_TIMEOUT_S`, default 1800 s), on reads and writes alike.

use super::Collective;
use crate::error::{Error, Result};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

const MAGIC: u32 = 0x5233_4447; // "R3DG"
/// Rank 0's refusal starts with its own word, so that a rank of protocol version 1 (which took
/// any reply starting with [`MAGIC`] as an acceptance) stops with "not a retrom3 rank 0".
const REFUSAL: u32 = 0x5233_444e; // "R3DN"
/// 2: rank 0's reply carries a refusal code and its reason.
const VERSION: u32 = 2;
/// The most processes a group may have (the handshake carries ranks as u32).
pub const MAX_WORLD: usize = 65536;
/// How long rank 0 waits for a new connection's handshake (a rank sends it at once): a
/// connection that says nothing is dropped, so that it cannot hold up the rendezvous.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Refusal codes of rank 0's handshake reply (0: accepted).
const REFUSED_WORLD: u32 = 1;
const REFUSED_RANK: u32 = 2;

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
    timeout: Duration,
}

/// `R3_DIST_TIMEOUT_S`: how long a rank waits for a peer (to join, to send, to take data);
/// default 1800 s. A value that is not a whole number of seconds >= 1 is an error.
pub fn timeout_from_env() -> Result<Duration> {
    timeout_from(std::env::var("R3_DIST_TIMEOUT_S").ok().as_deref())
}

fn timeout_from(v: Option<&str>) -> Result<Duration> {
    let Some(v) = v else {
        return Ok(Duration::from_secs(1800));
    };
    match v.trim().parse::<u64>() {
        Ok(s) if s >= 1 => Ok(Duration::from_secs(s)),
        _ => Err(Error::Dist(format!(
            "R3_DIST_TIMEOUT_S={v:?} is not a whole number of seconds >= 1"
        ))),
    }
}

/// A timed-out socket call says so, with the limit and the variable that sets it (the OS says
/// "Resource temporarily unavailable").
fn describe(e: &std::io::Error, timeout: Duration) -> String {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
            "no progress within {} s (R3_DIST_TIMEOUT_S): that process hangs or stopped",
            timeout.as_secs()
        ),
        std::io::ErrorKind::UnexpectedEof => {
            format!("{e} (that process stopped: see its own error)")
        }
        _ => e.to_string(),
    }
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::Dist(format!("{what}: {e}"))
}

/// Read and write limits of a stream.
fn set_timeouts(s: &TcpStream, timeout: Duration, what: &str) -> Result<()> {
    s.set_read_timeout(Some(timeout))
        .and_then(|_| s.set_write_timeout(Some(timeout)))
        .map_err(io_err(what.to_string()))
}

fn read_u32s<const N: usize>(s: &mut TcpStream, what: &str, timeout: Duration) -> Result<[u32; N]> {
    let mut b = vec![0u8; 4 * N];
    s.read_exact(&mut b)
        .map_err(|e| Error::Dist(format!("{what}: {}", describe(&e, timeout))))?;
    let mut out = [0u32; N];
    for (i, c) in b.chunks_exact(4).enumerate() {
        out[i] = u32::from_le_bytes(c.try_into().expect("4 bytes"));
    }
    Ok(out)
}

fn write_u32s(s: &mut TcpStream, v: &[u32], what: &str, timeout: Duration) -> Result<()> {
    let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    s.write_all(&b)
        .map_err(|e| Error::Dist(format!("{what}: {}", describe(&e, timeout))))
}

/// Whether the peer of `s` has closed it (a joined rank does not send before the first
/// collective, so any byte waiting means it is alive).
fn closed(s: &TcpStream) -> bool {
    if s.set_nonblocking(true).is_err() {
        return true;
    }
    let r = s.peek(&mut [0u8; 1]);
    let _ = s.set_nonblocking(false);
    match r {
        Ok(n) => n == 0,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// What rank 0 makes of a new connection.
enum Hello {
    /// A rank of this group: its rank.
    Rank(usize),
    /// Not a rank of this group (a port scanner, another program, a second claim on a rank that
    /// is taken): dropped with a warning, the rendezvous goes on.
    Stray(String),
    /// A retrom3 rank of another version or `WORLD_SIZE`: it is told why, and the group fails.
    Fatal(Error),
}

/// Rank 0's side of one handshake: read the peer's hello, reply with 0 (accepted) or a refusal
/// code and its reason.
fn greet(
    s: &mut TcpStream,
    addr: &std::net::SocketAddr,
    world: usize,
    taken: &[bool],
    timeout: Duration,
) -> Hello {
    let what = format!("rank 0: handshake from {addr}");
    if let Err(e) = set_timeouts(s, HANDSHAKE_TIMEOUT.min(timeout), &what) {
        return Hello::Stray(e.to_string());
    }
    let hello = match read_u32s::<4>(s, &what, HANDSHAKE_TIMEOUT.min(timeout)) {
        Ok(h) => h,
        Err(e) => return Hello::Stray(e.to_string()),
    };
    let [magic, version, rank, their_world] = hello;
    if magic != MAGIC {
        return Hello::Stray(format!("{what}: not a retrom3 rank"));
    }
    let (rank, their_world) = (rank as usize, their_world as usize);
    let refusal = if version != VERSION {
        Some((
            REFUSED_WORLD,
            format!(
                "rank {rank} runs group protocol version {version}, rank 0 version {VERSION}: \
                 every rank must run the same retrom3"
            ),
        ))
    } else if their_world != world {
        Some((
            REFUSED_WORLD,
            format!("rank {rank} was started with WORLD_SIZE={their_world}, rank 0 with {world}"),
        ))
    } else if rank == 0 || rank >= world || taken[rank - 1] {
        Some((
            REFUSED_RANK,
            format!(
                "rank {rank} is already taken at rank 0's address (or out of range for \
                 WORLD_SIZE={world}): two processes were given RANK={rank}, or two jobs share \
                 MASTER_PORT"
            ),
        ))
    } else {
        None
    };
    let Some((code, reason)) = refusal else {
        return match write_u32s(s, &[MAGIC, 0], &what, timeout) {
            Ok(()) => Hello::Rank(rank),
            Err(e) => Hello::Stray(e.to_string()),
        };
    };
    // The refused process is told why (best effort: it may be gone).
    let mut reply: Vec<u8> = [REFUSAL, code, reason.len() as u32]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    reply.extend_from_slice(reason.as_bytes());
    let _ = s.write_all(&reply);
    if code == REFUSED_RANK {
        // The group may still form with the process that holds the rank.
        Hello::Stray(format!("{what}: refused: {reason}"))
    } else {
        Hello::Fatal(Error::Dist(format!("rank 0: {reason}")))
    }
}

impl TcpGroup {
    /// Rank 0: accept the `world - 1` peers on `listener` (each announces its rank). A
    /// connection that is not a rank of this group (no handshake within 10 s, not retrom3, a rank
    /// already taken) is dropped with a warning on stderr; a rank started with another
    /// `WORLD_SIZE` or version stops the group, and is told why.
    pub fn host(listener: TcpListener, world: usize) -> Result<TcpGroup> {
        check_world(world)?;
        let timeout = timeout_from_env()?;
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
                    // A rank that joined and stopped before the group formed (and may be
                    // restarting now) frees its slot.
                    for slot in slots.iter_mut() {
                        if slot.as_ref().is_some_and(closed) {
                            *slot = None;
                            joined -= 1;
                        }
                    }
                    let taken: Vec<bool> = slots.iter().map(Option::is_some).collect();
                    match greet(&mut s, &addr, world, &taken, timeout) {
                        Hello::Rank(rank) => {
                            set_timeouts(&s, timeout, &format!("rank 0: rank {rank}"))?;
                            let _ = s.set_nodelay(true);
                            slots[rank - 1] = Some(s);
                            joined += 1;
                        }
                        Hello::Stray(why) => {
                            eprintln!("warning: {why}; connection dropped, still waiting for ranks")
                        }
                        Hello::Fatal(e) => return Err(e),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if start.elapsed() > timeout {
                        let missing: Vec<usize> =
                            (1..world).filter(|r| slots[r - 1].is_none()).collect();
                        return Err(Error::Dist(format!(
                            "rank 0: ranks {missing:?} did not join within {} s \
                             (R3_DIST_TIMEOUT_S)",
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
            timeout,
        })
    }

    /// Rank `rank` > 0: connect to rank 0 at `addr` (retrying until `R3_DIST_TIMEOUT_S`, since
    /// rank 0 may start later; a note on stderr after 30 s).
    pub fn join(addr: &str, rank: usize, world: usize) -> Result<TcpGroup> {
        check_world(world)?;
        if rank == 0 || rank >= world {
            return Err(Error::Dist(format!(
                "join: rank {rank} of {world} (rank 0 hosts the group)"
            )));
        }
        let timeout = timeout_from_env()?;
        let start = Instant::now();
        let mut noted = false;
        let mut s = loop {
            match TcpStream::connect(addr) {
                Ok(s) => break s,
                Err(e) => {
                    if start.elapsed() > timeout {
                        return Err(Error::Dist(format!(
                            "rank {rank}: cannot reach rank 0 at {addr} (MASTER_ADDR:MASTER_PORT) \
                             within {} s (R3_DIST_TIMEOUT_S): {e}",
                            timeout.as_secs()
                        )));
                    }
                    if !noted && start.elapsed() > Duration::from_secs(30) {
                        noted = true;
                        eprintln!(
                            "rank {rank}: rank 0 at {addr} is not answering yet ({e}); retrying \
                             for up to {} s (R3_DIST_TIMEOUT_S)",
                            timeout.as_secs()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        let what = format!("rank {rank}: handshake with rank 0 at {addr}");
        set_timeouts(&s, timeout, &what)?;
        let _ = s.set_nodelay(true);
        write_u32s(
            &mut s,
            &[MAGIC, VERSION, rank as u32, world as u32],
            &what,
            timeout,
        )?;
        let [magic, code] = read_u32s::<2>(&mut s, &what, timeout)?;
        if magic == REFUSAL {
            // The reason follows: its length, then the text.
            let reason = read_u32s::<1>(&mut s, &what, timeout).and_then(|[n]| {
                let mut b = vec![0u8; (n as usize).min(4096)];
                s.read_exact(&mut b)
                    .map_err(|e| Error::Dist(format!("{what}: {}", describe(&e, timeout))))?;
                Ok(String::from_utf8_lossy(&b).into_owned())
            });
            return Err(Error::Dist(match reason {
                Ok(r) => format!("rank {rank}: refused by rank 0: {r}"),
                Err(e) => format!("rank {rank}: refused by rank 0 (code {code}): {e}"),
            }));
        }
        if magic != MAGIC || code != 0 {
            return Err(Error::Dist(format!("{what}: not a retrom3 rank 0")));
        }
        Ok(TcpGroup {
            rank,
            world,
            peers: vec![s],
            seq: 0,
            timeout,
        })
    }

    fn send(&mut self, to: usize, op: Op, payload: &[u8]) -> Result<()> {
        let idx = if self.rank == 0 { to - 1 } else { 0 };
        let mut head = Vec::with_capacity(17);
        head.push(op as u8);
        head.extend_from_slice(&self.seq.to_le_bytes());
        head.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        let (rank, timeout) = (self.rank, self.timeout);
        let s = &mut self.peers[idx];
        let what = |e: std::io::Error| {
            Error::Dist(format!(
                "rank {rank}: sending {} to rank {to}: {}",
                Op::name(op as u8),
                describe(&e, timeout)
            ))
        };
        s.write_all(&head).map_err(what)?;
        s.write_all(payload).map_err(what)
    }

    fn recv(&mut self, from: usize, op: Op) -> Result<Vec<u8>> {
        let idx = if self.rank == 0 { from - 1 } else { 0 };
        let (rank, seq, timeout) = (self.rank, self.seq, self.timeout);
        let s = &mut self.peers[idx];
        let what = |e: std::io::Error| {
            Error::Dist(format!(
                "rank {rank}: waiting for rank {from} in {} #{seq}: {}",
                Op::name(op as u8),
                describe(&e, timeout)
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

/// A group of `world` processes is at most [`MAX_WORLD`].
pub fn check_world(world: usize) -> Result<()> {
    if world == 0 || world > MAX_WORLD {
        return Err(Error::Dist(format!(
            "WORLD_SIZE={world}: a group has 1 to {MAX_WORLD} processes"
        )));
    }
    Ok(())
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
    fn timeout_values() {
        assert_eq!(timeout_from(None).unwrap(), Duration::from_secs(1800));
        assert_eq!(timeout_from(Some(" 5 ")).unwrap(), Duration::from_secs(5));
        for bad in ["0", "-5", "abc", "1.5", ""] {
            let e = timeout_from(Some(bad)).unwrap_err().to_string();
            assert!(e.contains("R3_DIST_TIMEOUT_S"), "{bad}: {e}");
        }
    }

    /// Connections that are not ranks of the group (garbage, a closed socket, an HTTP request, a
    /// second claim on a rank) are dropped and the group still forms; the refused duplicate is
    /// told why. A rank with another WORLD_SIZE stops rank 0, and is told why too.
    #[test]
    fn the_rendezvous_survives_strays_and_refuses_misfits() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let host = std::thread::spawn(move || TcpGroup::host(listener, 3));
        // Strays first.
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(b"garbage").unwrap();
        drop(s);
        drop(TcpStream::connect(&addr).unwrap());
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        drop(s);
        let a = addr.clone();
        let r1 = std::thread::spawn(move || TcpGroup::join(&a, 1, 3));
        let g1 = r1.join().unwrap().unwrap();
        // A second rank 1 is refused, with the reason.
        let e = TcpGroup::join(&addr, 1, 3).err().unwrap().to_string();
        assert!(
            e.contains("refused by rank 0") && e.contains("already taken"),
            "{e}"
        );
        let a = addr.clone();
        let r2 = std::thread::spawn(move || TcpGroup::join(&a, 2, 3));
        let mut g0 = host.join().unwrap().unwrap();
        let g2 = r2.join().unwrap().unwrap();
        // The group works.
        let peers: Vec<_> = [g1, g2]
            .into_iter()
            .map(|mut g| {
                std::thread::spawn(move || {
                    let mut v = vec![g.rank() as f32];
                    g.all_reduce_sum(&mut v).map(|_| v[0])
                })
            })
            .collect();
        let mut v = vec![0.0];
        g0.all_reduce_sum(&mut v).unwrap();
        assert_eq!(v, [3.0]);
        for p in peers {
            assert_eq!(p.join().unwrap().unwrap(), 3.0);
        }

        // A rank that joined and stopped before the group formed can be restarted.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let host = std::thread::spawn(move || TcpGroup::host(listener, 3));
        drop(TcpGroup::join(&addr, 1, 3).unwrap());
        std::thread::sleep(Duration::from_millis(50));
        let a = addr.clone();
        let r1 = std::thread::spawn(move || TcpGroup::join(&a, 1, 3));
        let g2 = TcpGroup::join(&addr, 2, 3).unwrap();
        let mut g0 = host.join().unwrap().unwrap();
        let mut g1 = r1.join().unwrap().unwrap();
        let t = std::thread::spawn(move || {
            let mut g2 = g2;
            g2.all_gather(&[2.0])
        });
        let t1 = std::thread::spawn(move || g1.all_gather(&[1.0]));
        assert_eq!(g0.all_gather(&[0.0]).unwrap(), [0.0, 1.0, 2.0]);
        assert_eq!(t.join().unwrap().unwrap(), [0.0, 1.0, 2.0]);
        assert_eq!(t1.join().unwrap().unwrap(), [0.0, 1.0, 2.0]);

        // Another WORLD_SIZE: rank 0 stops, the rank is told.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let host = std::thread::spawn(move || TcpGroup::host(listener, 2));
        let e = TcpGroup::join(&addr, 1, 3).err().unwrap().to_string();
        assert!(
            e.contains("refused by rank 0") && e.contains("WORLD_SIZE=3"),
            "{e}"
        );
        let e = host.join().unwrap().err().unwrap().to_string();
        assert!(
            e.contains("rank 1 was started with WORLD_SIZE=3, rank 0 with 2"),
            "{e}"
        );
    }

    /// A peer that stops taking data (SIGSTOP, a hang) is an error after the timeout on the
    /// sending side too: a large send blocked forever once the socket buffers were full.
    #[test]
    fn a_peer_that_takes_no_data_times_out() {
        let res = on_threads(2, |mut g| {
            g.timeout = Duration::from_secs(1);
            set_timeouts(&g.peers[0], g.timeout, "test").unwrap();
            if g.rank() == 1 {
                std::thread::sleep(Duration::from_secs(4));
                return Ok(());
            }
            let mut big = vec![0u8; 256 << 20];
            g.broadcast(&mut big)
        });
        let e = res[0].as_ref().unwrap_err().to_string();
        assert!(
            e.contains("sending broadcast to rank 1")
                && e.contains("no progress within 1 s (R3_DIST_TIMEOUT_S)"),
            "{e}"
        );
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
