//! The all-reduce of the `tcp` backend: CPU workers sum their gradients among themselves, so
//! the coordinator is off the gradient path as it is with NCCL.
//!
//! Topology: a star around rank 0. Every other rank keeps one TCP connection to rank 0; per
//! step it sends its gradient (one frame) and receives the sum. Rank 0 adds the buffers **in
//! rank order** — the order of the coordinator's gRPC reducer — so the sum does not depend on
//! arrival order and two runs with one seed give the same model. Rank 0 refuses a buffer of
//! the wrong size or with a NaN/infinity, naming the rank that sent it.
//!
//! Bootstrap goes through the coordinator like NCCL's: rank 0 listens on an ephemeral port and
//! sends its address and a fresh secret as its rendezvous; the coordinator relays it to the
//! admitted workers only, and rank 0 accepts only connections that present the secret.
//!
//! Wire format (little-endian): a connecting rank sends `MAGIC`, its rank (u32), the world
//! size (u32), the gradient length in elements (u64) and the secret (u16 length + bytes); rank
//! 0 answers with a u16-length message, empty when accepted. Each step is then a frame of the
//! step's sequence number (u64), the payload length in bytes (u64), and the payload.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use lockstep_common::auth::Token;
use lockstep_common::codec;

use crate::compute::Collective;

const MAGIC: &[u8; 8] = b"LSTCP\x00\x00\x01";
/// How long a rank waits for another rank's gradient before giving up, unless set with
/// [`TcpCollective::set_step_timeout`] (the worker uses `cluster.step_timeout_s`); the
/// coordinator's heartbeat timeout catches a dead or frozen worker much sooner.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(300);
/// How long an accepted connection has to present its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where rank 0 listens and the secret the other ranks present: what the coordinator relays.
#[derive(Clone, Debug)]
pub struct Rendezvous {
    /// Rank 0's listening address.
    pub addr: SocketAddr,
    /// The secret of this job's collective.
    pub secret: Token,
}

impl Rendezvous {
    /// The relayed form: `tcp1 <addr> <secret>`.
    pub fn to_bytes(&self) -> Vec<u8> {
        format!("tcp1 {} {}", self.addr, self.secret.expose()).into_bytes()
    }

    /// Parses the relayed form.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let text = std::str::from_utf8(bytes).context("the tcp rendezvous is not UTF-8")?;
        let mut parts = text.split(' ');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("tcp1"), Some(addr), Some(secret), None) => Ok(Self {
                addr: addr
                    .parse()
                    .with_context(|| format!("the tcp rendezvous address `{addr}`"))?,
                secret: Token::new(secret)?,
            }),
            _ => bail!(
                "the relayed rendezvous is not a tcp one (was the job started with another backend?)"
            ),
        }
    }
}

/// Rank 0 before the other ranks have connected.
pub struct Host {
    listener: TcpListener,
    rendezvous: Rendezvous,
}

impl Host {
    /// Listens on an ephemeral port of `ip`, the address the other ranks will connect to.
    pub fn bind(ip: IpAddr) -> Result<Self> {
        let listener = TcpListener::bind((ip, 0))
            .with_context(|| format!("listening for the other ranks on {ip}"))?;
        let addr = listener.local_addr()?;
        Ok(Self {
            listener,
            rendezvous: Rendezvous {
                addr,
                secret: Token::generate(),
            },
        })
    }

    /// What to send the other ranks.
    pub fn rendezvous(&self) -> &Rendezvous {
        &self.rendezvous
    }

    /// Waits until ranks 1..world have connected and presented the secret; connections that
    /// do not are refused and do not count. Fails after `timeout`.
    pub fn accept(
        self,
        world: u32,
        len: usize,
        device: &Device,
        timeout: Duration,
    ) -> Result<TcpCollective> {
        let deadline = Instant::now() + timeout;
        self.listener.set_nonblocking(true)?;
        let mut peers: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
        while peers.iter().any(Option::is_none) {
            let (mut stream, from) = match self.listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        let missing: Vec<String> = peers
                            .iter()
                            .enumerate()
                            .filter(|(_, p)| p.is_none())
                            .map(|(i, _)| (i + 1).to_string())
                            .collect();
                        bail!(
                            "rank(s) {} did not connect to rank 0 at {} within {}s; they must be able to reach \
                             it (set --advertise-addr on rank 0 if this host has several addresses)",
                            missing.join(", "),
                            self.rendezvous.addr,
                            timeout.as_secs()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => return Err(e).context("accepting a rank's connection"),
            };
            stream.set_nonblocking(false)?;
            stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
            let verdict = match read_handshake(&mut stream) {
                Ok(h) => {
                    let slot = (h.rank as usize).checked_sub(1).and_then(|i| peers.get(i));
                    if !self.rendezvous.secret.matches(&h.secret) {
                        Err("wrong secret".to_string())
                    } else if h.world != world || h.len != len as u64 {
                        Err(format!(
                            "it expects {} ranks and {} gradient values, this job has {world} and {len}",
                            h.world, h.len
                        ))
                    } else {
                        match slot {
                            None => Err(format!("rank {} is not a rank of {world}", h.rank)),
                            Some(Some(_)) => Err(format!("rank {} is already connected", h.rank)),
                            Some(None) => Ok(h.rank),
                        }
                    }
                }
                Err(e) => Err(format!("bad handshake: {e}")),
            };
            match verdict {
                Ok(rank) => {
                    write_reply(&mut stream, "")?;
                    tracing::debug!("rank {rank} connected from {from}");
                    peers[rank as usize - 1] = Some(stream);
                }
                Err(why) => {
                    tracing::warn!("refused a connection from {from}: {why}");
                    let _ = write_reply(&mut stream, &why);
                }
            }
        }
        let peers = peers.into_iter().flatten().collect();
        TcpCollective::new(0, peers, device)
    }
}

/// One rank's end of the star.
pub struct TcpCollective {
    rank: u32,
    /// Rank 0: the connections of ranks 1.. in rank order. Other ranks: the one to rank 0.
    peers: Vec<TcpStream>,
    device: Device,
    step_timeout: Duration,
    seq: u64,
    /// The last frame read (its buffer reused every step).
    frame: Vec<u8>,
    scratch: Vec<f32>,
}

impl TcpCollective {
    /// Connects rank `rank` (not 0) to rank 0 and presents the secret.
    pub fn connect(
        rendezvous: &Rendezvous,
        rank: u32,
        world: u32,
        len: usize,
        device: &Device,
        timeout: Duration,
    ) -> Result<Self> {
        if rank == 0 || rank >= world {
            bail!("rank {rank} of {world} cannot connect to rank 0");
        }
        let deadline = Instant::now() + timeout;
        let mut stream = loop {
            match TcpStream::connect_timeout(&rendezvous.addr, Duration::from_secs(5)) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!("connecting to rank 0 at {}: {e}", rendezvous.addr);
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "rank {rank} could not reach rank 0 at {} within {}s (set --advertise-addr on rank 0 \
                             to an address the other workers can reach)",
                            rendezvous.addr,
                            timeout.as_secs()
                        )
                    })
                }
            }
        };
        stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let secret = rendezvous.secret.expose().as_bytes();
        let mut hello = Vec::with_capacity(32 + secret.len());
        hello.extend_from_slice(MAGIC);
        hello.extend_from_slice(&rank.to_le_bytes());
        hello.extend_from_slice(&world.to_le_bytes());
        hello.extend_from_slice(&(len as u64).to_le_bytes());
        hello.extend_from_slice(&(secret.len() as u16).to_le_bytes());
        hello.extend_from_slice(secret);
        stream
            .write_all(&hello)
            .context("sending the handshake to rank 0")?;
        let reply = read_reply(&mut stream).context("reading rank 0's answer to the handshake")?;
        if !reply.is_empty() {
            bail!("rank 0 refused rank {rank}: {reply}");
        }
        Self::new(rank, vec![stream], device)
    }

    fn new(rank: u32, peers: Vec<TcpStream>, device: &Device) -> Result<Self> {
        for p in &peers {
            p.set_nodelay(true)?;
        }
        let mut collective = Self {
            rank,
            peers,
            device: device.clone(),
            step_timeout: STEP_TIMEOUT,
            seq: 0,
            frame: Vec::new(),
            scratch: Vec::new(),
        };
        collective.set_step_timeout(STEP_TIMEOUT)?;
        Ok(collective)
    }

    /// How long to wait for another rank's frame before failing.
    pub fn set_step_timeout(&mut self, timeout: Duration) -> Result<()> {
        let timeout = timeout.max(Duration::from_millis(1));
        for p in &self.peers {
            p.set_read_timeout(Some(timeout))?;
            p.set_write_timeout(Some(timeout))?;
        }
        self.step_timeout = timeout;
        Ok(())
    }

    /// The sum over all ranks of `values`, added in rank order.
    pub fn sum(&mut self, values: &[f32]) -> Result<Vec<f32>> {
        self.seq += 1;
        let seq = self.seq;
        if self.rank == 0 {
            codec::check_finite(values)
                .map_err(|e| anyhow!("rank 0's own gradient is malformed: {e}"))?;
            // From zero, like the gRPC reducer (0.0 + -0.0 is +0.0), so the sums match it.
            let mut sum: Vec<f32> = values.iter().map(|v| 0.0 + v).collect();
            for (i, peer) in self.peers.iter_mut().enumerate() {
                let rank = i + 1;
                read_frame(peer, seq, &mut self.frame, self.step_timeout)
                    .with_context(|| format!("receiving rank {rank}'s gradient"))?;
                self.scratch.resize(values.len(), 0.0);
                let theirs = codec::f32_view(&self.frame, &mut self.scratch)
                    .and_then(|v| codec::check_finite(v).map(|()| v))
                    .map_err(|e| anyhow!("rank {rank} sent a malformed gradient: {e}"))?;
                for (s, v) in sum.iter_mut().zip(theirs) {
                    *s += v;
                }
            }
            codec::check_finite(&sum)
                .map_err(|e| anyhow!("the summed gradient overflowed: {e}"))?;
            let bytes = codec::f32_le_bytes(&sum);
            for (i, peer) in self.peers.iter_mut().enumerate() {
                write_frame(peer, seq, &bytes, self.step_timeout)
                    .with_context(|| format!("sending the sum to rank {}", i + 1))?;
            }
            Ok(sum)
        } else {
            let peer = &mut self.peers[0];
            let timeout = self.step_timeout;
            write_frame(peer, seq, &codec::f32_le_bytes(values), timeout)
                .context("sending the gradient to rank 0")?;
            read_frame(peer, seq, &mut self.frame, timeout)
                .context("receiving the sum from rank 0")?;
            let mut sum = vec![0.0f32; values.len()];
            codec::decode_f32_into(&self.frame, &mut sum)
                .map_err(|e| anyhow!("rank 0 sent a malformed sum: {e}"))?;
            Ok(sum)
        }
    }
}

impl Collective for TcpCollective {
    fn all_reduce_sum(&mut self, flat: &Tensor) -> Result<Tensor> {
        let values = flat.flatten_all()?.to_vec1::<f32>()?;
        let n = values.len();
        let sum = self.sum(&values)?;
        Ok(Tensor::from_vec(sum, n, &self.device)?)
    }
}

struct Handshake {
    rank: u32,
    world: u32,
    len: u64,
    secret: Vec<u8>,
}

fn read_handshake(stream: &mut TcpStream) -> Result<Handshake> {
    let mut fixed = [0u8; 8 + 4 + 4 + 8 + 2];
    stream.read_exact(&mut fixed)?;
    if &fixed[..8] != MAGIC {
        bail!("not a lockstep tcp handshake");
    }
    let u32_at = |i: usize| u32::from_le_bytes(fixed[i..i + 4].try_into().expect("4 bytes"));
    let rank = u32_at(8);
    let world = u32_at(12);
    let len = u64::from_le_bytes(fixed[16..24].try_into().expect("8 bytes"));
    let secret_len = u16::from_le_bytes([fixed[24], fixed[25]]) as usize;
    let mut secret = vec![0u8; secret_len];
    stream.read_exact(&mut secret)?;
    Ok(Handshake {
        rank,
        world,
        len,
        secret,
    })
}

fn write_reply(stream: &mut TcpStream, message: &str) -> io::Result<()> {
    let bytes = &message.as_bytes()[..message.len().min(u16::MAX as usize)];
    let mut out = (bytes.len() as u16).to_le_bytes().to_vec();
    out.extend_from_slice(bytes);
    stream.write_all(&out)
}

fn read_reply(stream: &mut TcpStream) -> Result<String> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len)?;
    let mut text = vec![0u8; u16::from_le_bytes(len) as usize];
    stream.read_exact(&mut text)?;
    Ok(String::from_utf8_lossy(&text).into_owned())
}

fn write_frame(stream: &mut TcpStream, seq: u64, payload: &[u8], timeout: Duration) -> Result<()> {
    let io_error = |e| io_error(e, timeout);
    let mut header = [0u8; 16];
    header[..8].copy_from_slice(&seq.to_le_bytes());
    header[8..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    stream.write_all(&header).map_err(io_error)?;
    stream.write_all(payload).map_err(io_error)?;
    Ok(())
}

/// Reads one frame of step `seq` into `payload`; its length must match what is already
/// expected (`payload`'s capacity is reused).
fn read_frame(
    stream: &mut TcpStream,
    seq: u64,
    payload: &mut Vec<u8>,
    timeout: Duration,
) -> Result<()> {
    let io_error = |e| io_error(e, timeout);
    let mut header = [0u8; 16];
    stream.read_exact(&mut header).map_err(io_error)?;
    let got = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
    let len = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
    if got != seq {
        bail!("out of step: expected the frame of step {seq}, got {got}");
    }
    if len > (1 << 31) {
        bail!("a frame of {len} bytes is larger than any gradient");
    }
    payload.resize(len as usize, 0);
    stream.read_exact(payload).map_err(io_error)?;
    Ok(())
}

/// Says what a broken connection means for the user.
fn io_error(e: io::Error, timeout: Duration) -> anyhow::Error {
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionAborted => anyhow!("the other rank closed the connection ({e})"),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => anyhow!(
            "the other rank sent nothing for {:.1}s",
            timeout.as_secs_f64()
        ),
        _ => anyhow!(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Host {
        Host::bind("127.0.0.1".parse().unwrap()).unwrap()
    }

    #[test]
    fn rendezvous_round_trips_and_refuses_other_forms() {
        let h = host();
        let back = Rendezvous::parse(&h.rendezvous().to_bytes()).unwrap();
        assert_eq!(back.addr, h.rendezvous().addr);
        assert!(back
            .secret
            .matches(h.rendezvous().secret.expose().as_bytes()));
        assert!(Rendezvous::parse(&[7u8; 128]).is_err(), "an NCCL id");
        assert!(Rendezvous::parse(b"tcp1 nowhere secret").is_err());
        assert!(Rendezvous::parse(b"tcp1 127.0.0.1:1").is_err());
    }

    /// Runs `world` ranks on threads; rank r contributes `values(r)`.
    fn all_reduce(world: u32, values: impl Fn(u32) -> Vec<f32> + Sync) -> Vec<Result<Vec<f32>>> {
        let h = host();
        let rv = h.rendezvous().clone();
        let len = values(0).len();
        std::thread::scope(|s| {
            let zero = s.spawn(|| -> Result<Vec<f32>> {
                let mut c = h.accept(world, len, &Device::Cpu, Duration::from_secs(10))?;
                c.sum(&values(0))
            });
            let others: Vec<_> = (1..world)
                .map(|r| {
                    let rv = rv.clone();
                    let values = &values;
                    s.spawn(move || -> Result<Vec<f32>> {
                        let mut c = TcpCollective::connect(
                            &rv,
                            r,
                            world,
                            len,
                            &Device::Cpu,
                            Duration::from_secs(10),
                        )?;
                        c.sum(&values(r))
                    })
                })
                .collect();
            std::iter::once(zero)
                .chain(others)
                .map(|t| t.join().unwrap())
                .collect()
        })
    }

    #[test]
    fn every_rank_gets_the_rank_order_sum() {
        // Values whose sum depends on the order of addition: rank order must be used.
        let vals = |r: u32| vec![[1e8f32, 1.0, -1e8][r as usize], r as f32, 0.5];
        let results = all_reduce(3, vals);
        let expected = vec![(1e8f32 + 1.0) - 1e8, 3.0, 1.5];
        for (rank, r) in results.into_iter().enumerate() {
            assert_eq!(r.unwrap(), expected, "rank {rank}");
        }
    }

    #[test]
    fn a_non_finite_gradient_is_refused_naming_its_rank() {
        let results = all_reduce(2, |r| vec![1.0, if r == 1 { f32::NAN } else { 2.0 }]);
        let err = format!("{:#}", results[0].as_ref().unwrap_err());
        assert!(err.contains("rank 1 sent a malformed gradient"), "{err}");
        assert!(results[1].is_err(), "rank 1 must not get a sum");
    }

    #[test]
    fn a_wrong_secret_or_rank_is_refused_and_does_not_count() {
        let h = host();
        let mut wrong = h.rendezvous().clone();
        wrong.secret = Token::new("not-the-secret").unwrap();
        let good = h.rendezvous().clone();
        std::thread::scope(|s| {
            let zero = s.spawn(|| h.accept(2, 4, &Device::Cpu, Duration::from_secs(10)));
            let err = TcpCollective::connect(&wrong, 1, 2, 4, &Device::Cpu, Duration::from_secs(5))
                .err()
                .expect("a wrong secret must be refused");
            assert!(format!("{err:#}").contains("wrong secret"), "{err:#}");
            let err = TcpCollective::connect(&good, 1, 3, 4, &Device::Cpu, Duration::from_secs(5))
                .err()
                .expect("a different world size must be refused");
            assert!(format!("{err:#}").contains("expects 3 ranks"), "{err:#}");
            let mut one =
                TcpCollective::connect(&good, 1, 2, 4, &Device::Cpu, Duration::from_secs(5))
                    .unwrap();
            let mut zero = zero.join().unwrap().unwrap();
            let t = s.spawn(move || one.sum(&[1.0; 4]));
            assert_eq!(zero.sum(&[2.0; 4]).unwrap(), [3.0; 4]);
            assert_eq!(t.join().unwrap().unwrap(), vec![3.0; 4]);
        });
    }

    #[test]
    fn a_rank_that_never_connects_times_out_naming_it() {
        let err = host()
            .accept(3, 4, &Device::Cpu, Duration::from_millis(200))
            .err()
            .expect("nobody connected");
        assert!(
            format!("{err:#}").contains("rank(s) 1, 2 did not connect"),
            "{err:#}"
        );
    }

    /// Ranks 0 and 1 of a two-rank collective over 4 values, connected.
    fn pair() -> (TcpCollective, TcpCollective) {
        let h = host();
        let rv = h.rendezvous().clone();
        std::thread::scope(|s| {
            let zero = s.spawn(move || h.accept(2, 4, &Device::Cpu, Duration::from_secs(10)));
            let one =
                TcpCollective::connect(&rv, 1, 2, 4, &Device::Cpu, Duration::from_secs(5)).unwrap();
            (zero.join().unwrap().unwrap(), one)
        })
    }

    #[test]
    fn a_rank_that_goes_away_fails_the_all_reduce_instead_of_hanging() {
        let (mut zero, one) = pair();
        drop(one);
        let err = format!("{:#}", zero.sum(&[1.0; 4]).unwrap_err());
        assert!(err.contains("receiving rank 1's gradient"), "{err}");
        assert!(err.contains("closed the connection"), "{err}");
    }

    #[test]
    fn a_rank_that_stays_connected_but_silent_times_out() {
        let (mut zero, _one) = pair();
        zero.set_step_timeout(Duration::from_millis(200)).unwrap();
        let started = Instant::now();
        let err = format!("{:#}", zero.sum(&[1.0; 4]).unwrap_err());
        assert!(err.contains("sent nothing for 0.2s"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
