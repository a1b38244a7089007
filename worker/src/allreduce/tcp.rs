//! The all-reduce of the `tcp` backend: CPU workers average their gradients among themselves,
//! so the coordinator is off the gradient path as it is with NCCL.
//!
//! Topology: a star around the membership's rank 0. Every other rank keeps one TCP connection
//! to rank 0; per step it sends its shard gradients (one frame) and receives the average. Rank 0
//! places every shard by its index and runs [`average_in_shard_order`] — the coordinator's grpc
//! reducer — so the average does not depend on which rank computed which shard, and tcp and
//! grpc jobs give the same bits. Rank 0 refuses missing, repeated or wrongly sized shards, and
//! reports a non-finite one as divergence ([`Diverged`]).
//!
//! A write of the average to a rank that has just died does not fail the step at rank 0: the
//! average was complete, so rank 0 applies it like every rank that received it; the
//! coordinator then pauses the membership, and the survivors settle on the newest state.
//!
//! Bootstrap goes through the coordinator: rank 0 listens on an ephemeral port and sends its
//! address, a fresh secret and the membership epoch as its rendezvous; the coordinator relays
//! it to that membership's ranks only, and rank 0 accepts only connections that present the
//! secret, the membership, the world size and the gradient length it expects. When the job
//! uses TLS, the links do too ([`super::link`]): the rendezvous also carries the SHA-256 of
//! rank 0's certificate for this membership, and a rank refuses a rendezvous without one.
//!
//! Wire format (little-endian): a connecting rank sends `MAGIC`, its rank (u32), the world
//! size (u32), the gradient length in elements (u64), the membership (u64) and the secret (u16
//! length + bytes); rank 0 answers with a u16-length message, empty when accepted. Then the
//! ranks agree on shared memory ([`super::shm`]), in three more u16-length messages per link:
//! rank 0's offer (empty: none), the rank's answer (empty: mapped), rank 0's verdict (empty: every
//! rank mapped it, the gradients go through the segment from now on). Otherwise, a step frame
//! is the epoch (u64), the step (u64), the number of shards it holds `k` (u32), the step's
//! shard count (u32), `k` shard indices (u32 each), the payload length in bytes (u64) and the
//! payload (the `k` gradients back to back). Rank 0 answers with a frame of no shards whose
//! payload is the average.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use lockstep_common::auth::Token;
use lockstep_common::codec::{self, CodecError};
use lockstep_common::protocol::{printable, StepId, MAX_SHARDS};
use lockstep_common::reduce::{average_in_shard_order, Malformed};

use super::link::{self, HostTls, Link};
use super::shm::{self, Barrier, Layout, Offer, Segment, SharedAverage};
use super::{AllReduce, Bootstrap, Diverged, Former, ShardResult, StepWork};
use crate::abort::{AbortSignal, Interrupted};
use crate::state::Averaged;

const MAGIC: &[u8; 8] = b"LSTCP\x00\x00\x03";
/// How long a rank waits for another rank's gradient before giving up, unless set with
/// [`TcpCollective::set_step_timeout`] (the worker uses `cluster.step_timeout_s`); the
/// coordinator's heartbeat timeout catches a dead or frozen worker much sooner.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(300);
/// How long an accepted connection has to present its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where rank 0 listens, the secret the other ranks present, and the membership the collective
/// belongs to: what the coordinator relays.
#[derive(Clone, Debug)]
pub struct Rendezvous {
    /// Rank 0's listening address.
    pub addr: SocketAddr,
    /// The secret of this collective.
    pub secret: Token,
    /// The membership epoch.
    pub membership: u64,
    /// With TLS: the SHA-256 of rank 0's certificate.
    pub tls: Option<[u8; 32]>,
}

impl Rendezvous {
    /// The relayed form: `tcp2 <addr> <secret> <membership>[ <certificate sha256, hex>]`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut text = format!(
            "tcp2 {} {} {}",
            self.addr,
            self.secret.expose(),
            self.membership
        );
        if let Some(fingerprint) = &self.tls {
            text.push(' ');
            text.push_str(&hex::encode(fingerprint));
        }
        text.into_bytes()
    }

    /// Parses the relayed form.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let text = std::str::from_utf8(bytes).context("the tcp rendezvous is not UTF-8")?;
        let parts: Vec<&str> = text.split(' ').collect();
        match parts.as_slice() {
            ["tcp2", addr, secret, membership, tls @ ..] if tls.len() <= 1 => Ok(Self {
                addr: addr
                    .parse()
                    .with_context(|| format!("the tcp rendezvous address `{}`", printable(addr)))?,
                secret: Token::new(*secret)?,
                membership: membership
                    .parse()
                    .with_context(|| {
                        format!("the tcp rendezvous membership `{}`", printable(membership))
                    })?,
                tls: match tls.first() {
                    None => None,
                    Some(hex) => Some(
                        hex::decode(hex)
                            .ok()
                            .and_then(|b| <[u8; 32]>::try_from(b).ok())
                            .context("the tcp rendezvous certificate digest is not 64 hex digits")?,
                    ),
                },
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
    tls: Option<HostTls>,
}

impl Host {
    /// Listens on an ephemeral port of `ip`, the address the other ranks will connect to;
    /// with `tls`, only TLS connections with this membership's fresh certificate are taken.
    pub fn bind(ip: IpAddr, membership: u64, tls: bool) -> Result<Self> {
        let listener = TcpListener::bind((ip, 0))
            .with_context(|| format!("listening for the other ranks on {ip}"))?;
        let addr = listener.local_addr()?;
        let tls = tls.then(HostTls::generate).transpose()?;
        Ok(Self {
            listener,
            rendezvous: Rendezvous {
                addr,
                secret: Token::generate(),
                membership,
                tls: tls.as_ref().map(|t| t.fingerprint),
            },
            tls,
        })
    }

    /// What to send the other ranks.
    pub fn rendezvous(&self) -> &Rendezvous {
        &self.rendezvous
    }

    /// Waits until ranks 1..world have connected and presented the secret; connections that
    /// do not are refused and do not count. Fails after `timeout`, or when `abort` trips.
    pub fn accept(
        self,
        world: u32,
        len: usize,
        timeout: Duration,
        abort: &AbortSignal,
    ) -> Result<TcpCollective> {
        let deadline = Instant::now() + timeout;
        self.listener.set_nonblocking(true)?;
        let mut peers: Vec<Option<Link>> = (1..world).map(|_| None).collect();
        while peers.iter().any(Option::is_none) {
            abort.check()?;
            let (stream, from) = match self.listener.accept() {
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
            stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
            let mut stream = match &self.tls {
                Some(_) if !link::starts_tls(&stream) => {
                    // Told in plaintext, which is what it speaks.
                    tracing::warn!(
                        "refused a plaintext connection from {from}: this collective uses TLS"
                    );
                    let _ = write_reply(
                        &mut Link::Plain(stream),
                        "this collective uses TLS, the connection was plaintext",
                    );
                    continue;
                }
                Some(tls) => tls.accept(stream)?,
                None => Link::Plain(stream),
            };
            let verdict = match read_handshake(&mut stream) {
                Ok(h) => {
                    let slot = (h.rank as usize).checked_sub(1).and_then(|i| peers.get(i));
                    if !self.rendezvous.secret.matches(&h.secret) {
                        Err("wrong secret".to_string())
                    } else if h.membership != self.rendezvous.membership {
                        Err(format!(
                            "it belongs to membership {}, this collective to membership {}",
                            h.membership, self.rendezvous.membership
                        ))
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
        TcpCollective::new(0, world, peers, len, abort)
    }
}

/// One rank's end of the star.
pub struct TcpCollective {
    rank: u32,
    world: u32,
    /// Rank 0: the connections of ranks 1.. in rank order. Other ranks: the one to rank 0.
    peers: Vec<Link>,
    /// Gradient length in elements.
    len: usize,
    step_timeout: Duration,
    /// The frames last read, one per peer (their buffers reused every step).
    frames: Vec<Frame>,
    /// The last average, handed to the optimizer without a copy ([`Averaged::Host`]).
    average: Arc<Vec<f32>>,
    /// The segment the ranks share when they are on one host ([`TcpCollective::share_memory`]):
    /// then the gradients go through it, and the links only tell that a rank left.
    shm: Option<Segment>,
    abort: AbortSignal,
}

/// A received step frame.
#[derive(Default)]
struct Frame {
    shards: Vec<u32>,
    payload: Vec<u8>,
}

impl TcpCollective {
    /// Connects rank `rank` (not 0) to rank 0 and presents the secret.
    pub fn connect(
        rendezvous: &Rendezvous,
        rank: u32,
        world: u32,
        len: usize,
        timeout: Duration,
        abort: &AbortSignal,
    ) -> Result<Self> {
        if rank == 0 || rank >= world {
            bail!("rank {rank} of {world} cannot connect to rank 0");
        }
        let deadline = Instant::now() + timeout;
        let stream = loop {
            abort.check()?;
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
        stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let mut stream = match rendezvous.tls {
            Some(fingerprint) => link::connect_pinned(stream, fingerprint)?,
            None => Link::Plain(stream),
        };
        let secret = rendezvous.secret.expose().as_bytes();
        let mut hello = Vec::with_capacity(40 + secret.len());
        hello.extend_from_slice(MAGIC);
        hello.extend_from_slice(&rank.to_le_bytes());
        hello.extend_from_slice(&world.to_le_bytes());
        hello.extend_from_slice(&(len as u64).to_le_bytes());
        hello.extend_from_slice(&rendezvous.membership.to_le_bytes());
        hello.extend_from_slice(&(secret.len() as u16).to_le_bytes());
        hello.extend_from_slice(secret);
        stream
            .write_all(&hello)
            .and_then(|()| stream.flush())
            .context("sending the handshake to rank 0")?;
        let reply = read_reply(&mut stream).context("reading rank 0's answer to the handshake")?;
        if !reply.is_empty() {
            bail!("rank 0 refused rank {rank}: {reply}");
        }
        Self::new(rank, world, vec![stream], len, abort)
    }

    fn new(
        rank: u32,
        world: u32,
        peers: Vec<Link>,
        len: usize,
        abort: &AbortSignal,
    ) -> Result<Self> {
        let mut clones = Vec::with_capacity(peers.len());
        for p in &peers {
            p.socket().set_nodelay(true)?;
            clones.push(p.socket().try_clone()?);
        }
        // A pause or the job's end unblocks a rank waiting on a peer that will never answer.
        abort.on_trip(move || {
            for c in &clones {
                let _ = c.shutdown(Shutdown::Both);
            }
        });
        let frames = peers.iter().map(|_| Frame::default()).collect();
        let mut collective = Self {
            rank,
            world,
            peers,
            len,
            step_timeout: STEP_TIMEOUT,
            frames,
            average: Arc::new(vec![0.0; len]),
            shm: None,
            abort: abort.clone(),
        };
        collective.set_step_timeout(STEP_TIMEOUT)?;
        Ok(collective)
    }

    /// Whether the gradients go through shared memory.
    pub fn shares_memory(&self) -> bool {
        self.shm.is_some()
    }

    /// Agrees, over the links just formed, on whether the ranks share memory for `shards`
    /// shards per step: rank 0 offers a segment (unless `want` is false on its side), every
    /// rank tries to map it and answers, and rank 0 tells all of them the outcome. They share
    /// only if every rank mapped it; otherwise the gradients stay on the links, and rank 0 logs
    /// why. Rank 0 removes the segment's file once every rank has answered.
    pub fn share_memory(&mut self, shards: u32, want: bool) -> Result<()> {
        for p in &self.peers {
            p.socket().set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
            p.socket().set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
        }
        let layout = Layout::new(self.world, shards, self.len);
        let outcome = if self.rank == 0 {
            self.offer_memory(layout, want)
        } else {
            self.take_memory(layout, want)
        };
        self.set_step_timeout(self.step_timeout)?;
        outcome
    }

    fn offer_memory(&mut self, layout: Option<Layout>, want: bool) -> Result<()> {
        if self.peers.is_empty() {
            return Ok(()); // nobody to share with
        }
        let made = if want {
            layout
                .context("the gradients are too large to map")
                .and_then(Segment::create)
        } else {
            Err(anyhow!("cluster.shared_memory is false"))
        };
        let offer = made.as_ref().map_or(String::new(), |(_, o)| o.to_text());
        for (i, peer) in self.peers.iter_mut().enumerate() {
            write_reply(peer, &offer)
                .with_context(|| format!("offering shared memory to rank {}", i + 1))?;
        }
        let mut refusals = Vec::new();
        for (i, peer) in self.peers.iter_mut().enumerate() {
            let answer = read_reply(peer)
                .with_context(|| format!("reading rank {}'s answer to the shared memory", i + 1))?;
            if !answer.is_empty() {
                refusals.push(format!("rank {} could not map it: {answer}", i + 1));
            }
        }
        let verdict = match &made {
            Err(e) => format!("{e:#}"),
            Ok(_) => refusals.join("; "),
        };
        for (i, peer) in self.peers.iter_mut().enumerate() {
            write_reply(peer, &verdict)
                .with_context(|| format!("telling rank {} whether memory is shared", i + 1))?;
        }
        match made {
            Ok((mut segment, _)) => {
                segment.unlink();
                if verdict.is_empty() {
                    tracing::info!(
                        "the {} ranks share memory: gradients go through {} ({} MiB), the links only watch for a \
                         rank leaving",
                        self.world,
                        shm::DIR,
                        segment.layout().size().div_ceil(1 << 20)
                    );
                    self.shm = Some(segment);
                } else {
                    tracing::info!("the ranks all-reduce over their links: {verdict}");
                }
            }
            Err(_) => tracing::info!("the ranks all-reduce over their links: {verdict}"),
        }
        Ok(())
    }

    fn take_memory(&mut self, layout: Option<Layout>, want: bool) -> Result<()> {
        let peer = &mut self.peers[0];
        let offer = read_reply(peer).context("reading rank 0's shared-memory offer")?;
        let (mapped, answer) = if offer.is_empty() {
            (None, "none offered".to_string())
        } else if !want {
            (None, "cluster.shared_memory is false here".to_string())
        } else {
            let opened = Offer::parse(&offer).and_then(|o| {
                Segment::open(&o, layout.context("the gradients are too large to map")?)
            });
            match opened {
                Ok(segment) => (Some(segment), String::new()),
                Err(e) => (None, format!("{e:#}")),
            }
        };
        write_reply(peer, &answer).context("answering rank 0's shared-memory offer")?;
        let verdict = read_reply(peer).context("reading whether memory is shared")?;
        if verdict.is_empty() {
            self.shm = Some(mapped.context("rank 0 shares memory this rank could not map")?);
            tracing::debug!("rank {} shares memory with rank 0", self.rank);
        } else {
            tracing::debug!("rank {} all-reduces over its link: {verdict}", self.rank);
        }
        Ok(())
    }

    /// The shared-memory all-reduce of step `id`: this rank's shards (`write` puts one into
    /// its slot) are published and every other rank's awaited; then each rank sums its part of
    /// the values, in shard order, into the segment's average, and awaits the other parts.
    /// Returns the average, read in place.
    fn average_shared<T>(
        &mut self,
        id: StepId,
        shard_count: u32,
        global: u32,
        own: &[(u32, T)],
        write: impl Fn(&T, &mut [u8]) -> Result<()>,
    ) -> Result<SharedAverage> {
        let Self {
            rank,
            world,
            peers,
            step_timeout,
            shm,
            abort,
            ..
        } = self;
        let segment = shm.as_mut().context("no shared memory")?;
        let shards = segment.layout().shards;
        if shard_count != shards {
            bail!("{id} has {shard_count} shards, the shared memory was made for {shards}");
        }
        let counter = segment.next_counter();
        let mut held = Vec::with_capacity(own.len());
        for (shard, gradient) in own {
            write(gradient, segment.slot_mut(counter, *shard)?)?;
            held.push(*shard);
        }
        segment.publish(*rank, counter, id.epoch, id.step, &held)?;
        let deadline = Instant::now() + *step_timeout;
        // The same words as over the links.
        let mut check = || {
            abort.check()?;
            if peers.iter().any(|p| shm::peer_gone(p.socket())) {
                bail!("the other rank closed the connection");
            }
            Ok(())
        };
        let mut wait_for_all = |segment: &Segment, what: Barrier| -> Result<()> {
            for other in (0..*world).filter(|r| r != rank) {
                let published = segment
                    .wait_for(what, other, counter, deadline, &mut check)
                    .with_context(|| format!("receiving rank {other}'s {what}"))?;
                if !published {
                    bail!(
                        "receiving rank {other}'s {what}: the other rank sent nothing for {:.1}s",
                        step_timeout.as_secs_f64()
                    );
                }
            }
            Ok(())
        };
        wait_for_all(segment, Barrier::Gradients)?;
        // Every shard of the step, by index, with the rank that published it.
        let mut owners: Vec<Option<u32>> = vec![None; shard_count as usize];
        for r in 0..*world {
            let (epoch, step, held) = segment.record(r, counter);
            let got = StepId::new(epoch, step);
            if got != id {
                bail!("out of step: rank {r} published {got} where {id} was expected");
            }
            for shard in held {
                place(&mut owners, shard, r, id)?;
            }
        }
        check_complete(&owners, id)?;
        // This rank's part: the same sum per value as over the whole, so the same bits.
        let part = segment.layout().part(*rank);
        let bytes = part.start * 4..part.end * 4;
        let data: Vec<&[u8]> = (0..shard_count)
            .map(|s| &segment.slot(counter, s)[bytes.clone()])
            .collect();
        let status = average_in_shard_order(&data, global, segment.part_mut(*rank, counter))
            .err()
            .map(|bad| {
                let index = match bad.error {
                    CodecError::NonFinite(i) => i as u64,
                    _ => 0,
                };
                (bad.part as u32, index)
            });
        segment.publish_part(*rank, counter, status);
        wait_for_all(segment, Barrier::Part)?;
        // Every rank names the same culprit, the one the whole sum names: the first shard with a
        // value that is not finite anywhere, else (an overflow) the last shard.
        let culprit = (0..*world)
            .filter_map(|r| segment.part_status(r, counter))
            .min_by_key(|(part, _)| *part);
        if let Some((part, index)) = culprit {
            let bad = Malformed {
                part: part as usize,
                error: CodecError::NonFinite(index as usize),
            };
            return Err(reduce_error(bad, &owners, id));
        }
        Ok(segment.average(counter))
    }

    /// How long to wait for another rank's frame before failing.
    pub fn set_step_timeout(&mut self, timeout: Duration) -> Result<()> {
        let timeout = timeout.max(Duration::from_millis(1));
        for p in &self.peers {
            p.socket().set_read_timeout(Some(timeout))?;
            p.socket().set_write_timeout(Some(timeout))?;
        }
        self.step_timeout = timeout;
        Ok(())
    }

    /// The average of step `id` over all its `shard_count` shards, each rank bringing its own
    /// (`own`: shard index and little-endian f32 bytes, in shard order): summed in shard order
    /// and divided by `global` at rank 0, which sends it to every rank.
    pub fn average(
        &mut self,
        id: StepId,
        shard_count: u32,
        global: u32,
        own: &[(u32, Vec<u8>)],
    ) -> Result<&[f32]> {
        if self.shm.is_some() {
            let len = self.len;
            let shared = self.average_shared(id, shard_count, global, own, |bytes, slot| {
                if bytes.len() != len * 4 {
                    bail!(
                        "a shard gradient of {} bytes, {} expected",
                        bytes.len(),
                        len * 4
                    );
                }
                slot.copy_from_slice(bytes);
                Ok(())
            })?;
            let average = Arc::make_mut(&mut self.average);
            average.copy_from_slice(&shared);
            return Ok(average.as_slice());
        }
        if self.rank != 0 {
            let peer = &mut self.peers[0];
            let timeout = self.step_timeout;
            write_frame(peer, id, shard_count, own, timeout)
                .context("sending the shard gradients to rank 0")?;
            let frame = &mut self.frames[0];
            read_frame(peer, id, self.len, Holds::Average, frame, timeout)
                .context("receiving the average from rank 0")?;
            let average = Arc::make_mut(&mut self.average).as_mut_slice();
            codec::le_f32s_into(&frame.payload, average)
                .and_then(|()| codec::check_finite(average))
                .map_err(|e| anyhow!("rank 0 sent a malformed average: {e}"))?;
            return Ok(&self.average);
        }
        for (i, peer) in self.peers.iter_mut().enumerate() {
            read_frame(
                peer,
                id,
                self.len,
                Holds::Shards(shard_count),
                &mut self.frames[i],
                self.step_timeout,
            )
            .with_context(|| format!("receiving rank {}'s shard gradients", i + 1))?;
        }
        // Every shard of the step, by index, with the rank that sent it.
        let mut owners: Vec<Option<u32>> = vec![None; shard_count as usize];
        let mut data: Vec<&[u8]> = vec![&[]; shard_count as usize];
        let bytes = self.len * 4;
        let theirs = self.frames.iter().enumerate().flat_map(|(i, f)| {
            f.shards
                .iter()
                .enumerate()
                .map(move |(k, &s)| (s, &f.payload[k * bytes..(k + 1) * bytes], i as u32 + 1))
        });
        let ours = own.iter().map(|(s, b)| (*s, b.as_slice(), 0));
        for (shard, part, rank) in ours.chain(theirs) {
            place(&mut owners, shard, rank, id)?;
            data[shard as usize] = part;
        }
        check_complete(&owners, id)?;
        if let Err(bad) = average_in_shard_order(
            &data,
            global,
            Arc::make_mut(&mut self.average).as_mut_slice(),
        ) {
            return Err(reduce_error(bad, &owners, id));
        }
        let average = codec::le_bytes(&self.average);
        for (i, peer) in self.peers.iter_mut().enumerate() {
            // The average is complete: a rank that cannot take it is gone or frozen, and the
            // coordinator is about to pause this membership; rank 0 still applies the step.
            if let Err(e) = write_reply_frame(peer, id, &average, self.step_timeout) {
                tracing::warn!("sending the average of {id} to rank {}: {e:#}", i + 1);
            }
        }
        Ok(&self.average)
    }
}

impl Drop for TcpCollective {
    /// Closes the connections even while the abort hook holds clones of them, so the peers see
    /// this rank leave at once.
    fn drop(&mut self) {
        for p in &self.peers {
            let _ = p.socket().shutdown(Shutdown::Both);
        }
    }
}

impl AllReduce for TcpCollective {
    fn submit(&mut self, step: &StepWork, shards: Vec<ShardResult>) -> Result<Option<Averaged>> {
        if self.shm.is_some() {
            // Straight from the gradients' tensors into the slots: no copy of their own.
            let own: Vec<(u32, &ShardResult)> = shards.iter().map(|s| (s.index, s)).collect();
            let shared = self.average_shared(
                step.id.id,
                step.shard_count,
                step.global_count,
                &own,
                |s, slot| Ok(s.gradient.write_le_into(slot)?),
            )?;
            return Ok(Some(Averaged::Shared(shared)));
        }
        let own = shards
            .iter()
            .map(|s| Ok((s.index, s.gradient.to_bytes()?)))
            .collect::<Result<Vec<_>>>()?;
        self.average(step.id.id, step.shard_count, step.global_count, &own)?;
        Ok(Some(Averaged::Host(Arc::clone(&self.average))))
    }
}

/// Forms tcp collectives: rank 0 listens on `advertise`; the others connect to it.
pub struct TcpFormer {
    /// The address rank 0 advertises.
    pub advertise: IpAddr,
    /// Gradient length in elements.
    pub len: usize,
    /// How long a rank waits for a peer's frame (`cluster.step_timeout_s`).
    pub step_timeout: Duration,
    /// Whether the job uses TLS: then the links do too, and a plaintext rendezvous is refused.
    pub tls: bool,
    /// Shards per step (the shared memory's slots).
    pub shards: u32,
    /// Whether ranks on one host may share memory (`cluster.shared_memory`).
    pub shared_memory: bool,
}

impl Former for TcpFormer {
    fn form(
        &mut self,
        membership: u64,
        rank: u32,
        world: u32,
        boot: &Bootstrap<'_>,
    ) -> Result<Box<dyn AllReduce>> {
        let mut collective = if rank == 0 {
            let host = Host::bind(self.advertise, membership, self.tls)?;
            tracing::info!(
                "rank 0 of membership {membership} listens for the other ranks on {}{}",
                host.rendezvous().addr,
                if self.tls { " (TLS)" } else { "" }
            );
            boot.publish(membership, host.rendezvous().to_bytes())?;
            host.accept(world, self.len, boot.timeout, boot.abort)?
        } else {
            let relayed = boot.await_relay(membership)?;
            let rendezvous = Rendezvous::parse(&relayed)?;
            if rendezvous.membership != membership {
                return Err(Interrupted).context("a rendezvous of another membership");
            }
            if self.tls && rendezvous.tls.is_none() {
                bail!(
                    "rank 0 of membership {membership} offered a plaintext link, but this job uses TLS (is rank 0 \
                     an older release?)"
                );
            }
            TcpCollective::connect(&rendezvous, rank, world, self.len, boot.timeout, boot.abort)?
        };
        collective.set_step_timeout(self.step_timeout)?;
        collective.share_memory(self.shards, self.shared_memory)?;
        Ok(Box::new(collective))
    }
}

/// Records that `rank` brought `shard` of step `id`; a shard out of range or brought twice is
/// refused.
fn place(owners: &mut [Option<u32>], shard: u32, rank: u32, id: StepId) -> Result<()> {
    let count = owners.len();
    match owners.get_mut(shard as usize) {
        Some(slot @ None) => *slot = Some(rank),
        Some(Some(first)) => {
            bail!("shard {shard} of {id} came from rank {first} and again from rank {rank}")
        }
        None => bail!("rank {rank} sent shard {shard}, but {id} has {count} shards"),
    }
    Ok(())
}

/// Fails unless every shard of step `id` was brought.
fn check_complete(owners: &[Option<u32>], id: StepId) -> Result<()> {
    let missing: Vec<String> = owners
        .iter()
        .enumerate()
        .filter(|(_, p)| p.is_none())
        .map(|(s, _)| s.to_string())
        .collect();
    if !missing.is_empty() {
        bail!("no rank sent shard(s) {} of {id}", missing.join(", "));
    }
    Ok(())
}

/// What a shard gradient the reducer refused means: divergence, or a malformed gradient
/// (`owners`: the rank that brought each shard).
fn reduce_error(bad: Malformed, owners: &[Option<u32>], id: StepId) -> anyhow::Error {
    let rank = owners.get(bad.part).copied().flatten().unwrap_or(0);
    match bad.error {
        CodecError::NonFinite(_) => Diverged(format!(
            "shard {} of {id} from rank {rank} holds a non-finite value: the model diverged (a learning \
             rate too high?)",
            bad.part
        ))
        .into(),
        other => anyhow!(
            "rank {rank} sent a malformed gradient for shard {}: {other}",
            bad.part
        ),
    }
}

struct Handshake {
    rank: u32,
    world: u32,
    len: u64,
    membership: u64,
    secret: Vec<u8>,
}

fn read_handshake(stream: &mut impl Read) -> Result<Handshake> {
    let mut fixed = [0u8; 8 + 4 + 4 + 8 + 8 + 2];
    stream.read_exact(&mut fixed)?;
    if &fixed[..8] != MAGIC {
        bail!("not a lockstep tcp handshake (or another Lockstep release)");
    }
    let u32_at = |i: usize| u32::from_le_bytes(fixed[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(fixed[i..i + 8].try_into().expect("8 bytes"));
    let secret_len = u16::from_le_bytes([fixed[32], fixed[33]]) as usize;
    let mut secret = vec![0u8; secret_len];
    stream.read_exact(&mut secret)?;
    Ok(Handshake {
        rank: u32_at(8),
        world: u32_at(12),
        len: u64_at(16),
        membership: u64_at(24),
        secret,
    })
}

fn write_reply(stream: &mut impl Write, message: &str) -> io::Result<()> {
    let bytes = &message.as_bytes()[..message.len().min(u16::MAX as usize)];
    let mut out = (bytes.len() as u16).to_le_bytes().to_vec();
    out.extend_from_slice(bytes);
    stream.write_all(&out)?;
    stream.flush()
}

fn read_reply(stream: &mut impl Read) -> Result<String> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len)?;
    let mut text = vec![0u8; u16::from_le_bytes(len) as usize];
    stream.read_exact(&mut text)?;
    Ok(printable(&String::from_utf8_lossy(&text)))
}

/// Header bytes before the shard indices: epoch, step, shards held, shard count.
const HEADER: usize = 8 + 8 + 4 + 4;

fn write_frame(
    stream: &mut impl Write,
    id: StepId,
    shard_count: u32,
    shards: &[(u32, Vec<u8>)],
    timeout: Duration,
) -> Result<()> {
    let io_error = |e| io_error(e, timeout);
    let payload: usize = shards.iter().map(|(_, b)| b.len()).sum();
    let mut header = Vec::with_capacity(HEADER + 4 * shards.len() + 8);
    header.extend_from_slice(&id.epoch.to_le_bytes());
    header.extend_from_slice(&id.step.to_le_bytes());
    header.extend_from_slice(&(shards.len() as u32).to_le_bytes());
    header.extend_from_slice(&shard_count.to_le_bytes());
    for (s, _) in shards {
        header.extend_from_slice(&s.to_le_bytes());
    }
    header.extend_from_slice(&(payload as u64).to_le_bytes());
    stream.write_all(&header).map_err(io_error)?;
    for (_, b) in shards {
        stream.write_all(b).map_err(io_error)?;
    }
    stream.flush().map_err(io_error)?;
    Ok(())
}

fn write_reply_frame(
    stream: &mut impl Write,
    id: StepId,
    payload: &[u8],
    timeout: Duration,
) -> Result<()> {
    let io_error = |e| io_error(e, timeout);
    let mut header = Vec::with_capacity(HEADER + 8);
    header.extend_from_slice(&id.epoch.to_le_bytes());
    header.extend_from_slice(&id.step.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    stream.write_all(&header).map_err(io_error)?;
    stream.write_all(payload).map_err(io_error)?;
    stream.flush().map_err(io_error)?;
    Ok(())
}

/// What a frame holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Holds {
    /// A rank's shard gradients: any number up to the step's shard count, zero included.
    Shards(u32),
    /// Rank 0's average.
    Average,
}

/// Reads one frame of step `id` into `frame`: shard gradients of `len` values each, or the
/// average of `len` values. Every size is checked before anything is allocated.
fn read_frame(
    stream: &mut impl Read,
    id: StepId,
    len: usize,
    holds: Holds,
    frame: &mut Frame,
    timeout: Duration,
) -> Result<()> {
    let io_error = |e| io_error(e, timeout);
    let mut header = [0u8; HEADER];
    stream.read_exact(&mut header).map_err(io_error)?;
    let u64_at = |i: usize| u64::from_le_bytes(header[i..i + 8].try_into().expect("8 bytes"));
    let u32_at = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().expect("4 bytes"));
    let got = StepId::new(u64_at(0), u64_at(8));
    let (k, _shard_count) = (u32_at(16), u32_at(20));
    if got != id {
        bail!("out of step: expected the frame of {id}, got {got}");
    }
    let most = match holds {
        Holds::Shards(shard_count) => shard_count.min(MAX_SHARDS),
        Holds::Average => 0,
    };
    if k > most {
        bail!(
            "a frame of {k} shards where {} was expected",
            match holds {
                Holds::Shards(_) => format!("at most the step's {most}"),
                Holds::Average => "the average".to_string(),
            }
        );
    }
    let mut indices = vec![0u8; 4 * k as usize];
    stream.read_exact(&mut indices).map_err(io_error)?;
    frame.shards.clear();
    frame.shards.extend(
        indices
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))),
    );
    let mut size = [0u8; 8];
    stream.read_exact(&mut size).map_err(io_error)?;
    let size = u64::from_le_bytes(size);
    let expected = match holds {
        Holds::Shards(_) => (len * 4 * k as usize) as u64,
        Holds::Average => (len * 4) as u64,
    };
    if size != expected {
        bail!("a frame of {size} bytes, expected {expected} ({k} shard(s) of {len} values)");
    }
    frame.payload.resize(size as usize, 0);
    stream.read_exact(&mut frame.payload).map_err(io_error)?;
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

    fn host_with(tls: bool) -> Host {
        Host::bind("127.0.0.1".parse().unwrap(), 3, tls).unwrap()
    }

    fn host() -> Host {
        host_with(false)
    }

    const T: Duration = Duration::from_secs(10);

    #[test]
    fn rendezvous_round_trips_and_refuses_other_forms() {
        let h = host();
        let back = Rendezvous::parse(&h.rendezvous().to_bytes()).unwrap();
        assert_eq!(back.addr, h.rendezvous().addr);
        assert_eq!(back.membership, 3);
        assert!(back
            .secret
            .matches(h.rendezvous().secret.expose().as_bytes()));
        assert!(Rendezvous::parse(&[7u8; 128]).is_err(), "an NCCL id");
        assert!(Rendezvous::parse(b"tcp2 nowhere secret 1").is_err());
        assert!(Rendezvous::parse(b"tcp2 127.0.0.1:1 secret").is_err());
        assert!(Rendezvous::parse(b"tcp1 127.0.0.1:1 secret").is_err());

        let h = host_with(true);
        let back = Rendezvous::parse(&h.rendezvous().to_bytes()).unwrap();
        assert_eq!(back.tls, h.rendezvous().tls);
        assert!(back.tls.is_some());
        assert!(Rendezvous::parse(b"tcp2 127.0.0.1:1 secret 1 abc").is_err());
        assert!(Rendezvous::parse(b"tcp2 127.0.0.1:1 secret 1 a b").is_err());
    }

    fn bytes(values: &[f32]) -> Vec<u8> {
        codec::le_bytes(values).into_owned()
    }

    /// Runs `world` ranks on threads, over TLS links when `tls`, through shared memory when
    /// `shm`; rank r contributes the shards `shards(r)`.
    fn average_with(
        tls: bool,
        shm: bool,
        world: u32,
        shard_count: u32,
        global: u32,
        shards: impl Fn(u32) -> Vec<(u32, Vec<f32>)> + Sync,
    ) -> Vec<Result<Vec<f32>>> {
        let abort = AbortSignal::default();
        let h = host_with(tls);
        let rv = h.rendezvous().clone();
        let len = shards(0)[0].1.len();
        let id = StepId::new(0, 5);
        let run = |mut c: TcpCollective, r: u32| -> Result<Vec<f32>> {
            c.share_memory(shard_count, shm)?;
            assert_eq!(c.shares_memory(), shm && world > 1, "rank {r}");
            let own: Vec<(u32, Vec<u8>)> = shards(r).iter().map(|(s, v)| (*s, bytes(v))).collect();
            Ok(c.average(id, shard_count, global, &own)?.to_vec())
        };
        std::thread::scope(|s| {
            let zero = s.spawn(|| run(h.accept(world, len, T, &abort)?, 0));
            let others: Vec<_> = (1..world)
                .map(|r| {
                    let (rv, abort, run) = (rv.clone(), abort.clone(), &run);
                    s.spawn(move || run(TcpCollective::connect(&rv, r, world, len, T, &abort)?, r))
                })
                .collect();
            std::iter::once(zero)
                .chain(others)
                .map(|t| t.join().unwrap())
                .collect()
        })
    }

    #[test]
    fn every_rank_gets_the_shard_order_average_whichever_rank_holds_which_shard() {
        // Values whose sum depends on the order of addition: shard order must be used.
        let shard = |s: u32| vec![[1e8f32, 1.0, -1e8][s as usize], s as f32, 0.5];
        let expected = vec![((1e8f32 + 1.0) - 1e8) / 4.0, 3.0 / 4.0, 1.5 / 4.0];
        // Three ranks with a shard each; rank 1 holding shards 0 and 2; one rank with all.
        type Mine = fn(u32) -> Vec<u32>;
        let layouts: [(u32, Mine); 3] = [
            (3, |r| vec![r]),
            (2, |r| if r == 0 { vec![1] } else { vec![0, 2] }),
            (1, |_| vec![0, 1, 2]),
        ];
        for (tls, shm) in [(false, false), (true, false), (false, true), (true, true)] {
            for (world, mine) in layouts {
                let results = average_with(tls, shm, world, 3, 4, |r| {
                    mine(r).into_iter().map(|s| (s, shard(s))).collect()
                });
                for (rank, r) in results.into_iter().enumerate() {
                    assert_eq!(
                        r.unwrap(),
                        expected,
                        "tls {tls}, shm {shm}, world {world} rank {rank}"
                    );
                }
            }
        }
        // The coordinator's reducer gives the same bits.
        let parts: Vec<Vec<u8>> = (0..3).map(|s| bytes(&shard(s))).collect();
        let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        let mut out = vec![0.0; 3];
        average_in_shard_order(&refs, 4, &mut out).unwrap();
        assert_eq!(out, expected);
    }

    #[test]
    fn a_non_finite_shard_is_divergence_naming_its_rank_and_a_missing_shard_is_refused() {
        for shm in [false, true] {
            let results = average_with(false, shm, 2, 2, 2, |r| {
                vec![(r, vec![1.0, if r == 1 { f32::NAN } else { 2.0 }])]
            });
            let err = results[0].as_ref().unwrap_err();
            assert!(super::super::is_diverged(err), "{err:#}");
            assert!(
                format!("{err:#}").contains("shard 1 of epoch 1 step 6 from rank 1"),
                "{err:#}"
            );
            assert!(results[1].is_err(), "rank 1 must not get an average");

            let results = average_with(false, shm, 2, 3, 2, |r| vec![(r, vec![1.0])]);
            let err = format!("{:#}", results[0].as_ref().unwrap_err());
            assert!(err.contains("no rank sent shard(s) 2"), "{err}");
            // Two ranks bringing the same shard.
            let results = average_with(false, shm, 2, 2, 2, |_| vec![(0, vec![1.0])]);
            let err = format!("{:#}", results[0].as_ref().unwrap_err());
            assert!(
                err.contains("shard 0 of epoch 1 step 6 came from rank 0 and again from rank 1"),
                "{err}"
            );
        }
    }

    #[test]
    fn ranks_summing_parts_name_the_shard_the_whole_sum_names() {
        // Shard 0 is poisoned in rank 1's part of the values, shard 1 in rank 0's: the whole
        // sum names shard 0 (the first with a bad value anywhere), and so must every rank.
        let shard = |s: u32| -> Vec<f32> {
            let mut v = vec![1.0; 4];
            v[if s == 0 { 3 } else { 0 }] = f32::NAN;
            v
        };
        for shm in [false, true] {
            let results = average_with(false, shm, 2, 2, 2, |r| vec![(r, shard(r))]);
            for (rank, r) in results.iter().enumerate() {
                let err = format!("{:#}", r.as_ref().unwrap_err());
                if shm || rank == 0 {
                    assert!(
                        err.contains(
                            "shard 0 of epoch 1 step 6 from rank 0 holds a non-finite value"
                        ),
                        "shm {shm}, rank {rank}: {err}"
                    );
                }
            }
        }
    }

    #[test]
    fn shared_memory_gives_the_links_bits_step_after_step_and_leaves_no_file() {
        // Five steps (both halves of the double buffer, twice), gradients that differ per
        // step, shard and rank, summed in an order-sensitive way.
        let len = 1000;
        let value = |step: u64, shard: u32, i: usize| {
            let x = (step as f32 + 1.0)
                * 1e7
                * if (i + shard as usize).is_multiple_of(3) {
                    -1.0
                } else {
                    1.0
                };
            x + (i as f32 * 0.37 + shard as f32).sin()
        };
        let run = |shm: bool| -> Vec<Vec<f32>> {
            let abort = AbortSignal::default();
            let h = host();
            let rv = h.rendezvous().clone();
            let ranks = |mut c: TcpCollective, r: u32| -> Vec<Vec<f32>> {
                c.share_memory(3, shm).unwrap();
                assert_eq!(c.shares_memory(), shm);
                let mine: Vec<u32> = if r == 0 { vec![2] } else { vec![0, 1] };
                (0..5u64)
                    .map(|step| {
                        let own: Vec<(u32, Vec<u8>)> = mine
                            .iter()
                            .map(|&s| {
                                (
                                    s,
                                    bytes(&(0..len).map(|i| value(step, s, i)).collect::<Vec<_>>()),
                                )
                            })
                            .collect();
                        c.average(StepId::new(1, step), 3, 96, &own)
                            .unwrap()
                            .to_vec()
                    })
                    .collect()
            };
            std::thread::scope(|s| {
                let one = s.spawn(|| {
                    ranks(
                        TcpCollective::connect(&rv, 1, 2, len, T, &abort).unwrap(),
                        1,
                    )
                });
                let zero = ranks(h.accept(2, len, T, &abort).unwrap(), 0);
                let one = one.join().unwrap();
                assert_eq!(zero, one, "both ranks get the same bits");
                zero
            })
        };
        let shared = run(true);
        assert_eq!(
            shared,
            run(false),
            "shared memory and the links agree bit for bit"
        );
        let leftover: Vec<_> = std::fs::read_dir(shm::DIR)
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("lockstep-{}-", std::process::id()))
            })
            .collect();
        assert!(leftover.is_empty(), "{leftover:?}");
    }

    #[test]
    fn one_rank_without_shared_memory_keeps_every_rank_on_the_links() {
        let abort = AbortSignal::default();
        let h = host();
        let rv = h.rendezvous().clone();
        std::thread::scope(|s| {
            let others: Vec<_> = (1..3)
                .map(|r| {
                    let (rv, abort) = (rv.clone(), abort.clone());
                    s.spawn(move || {
                        let mut c = TcpCollective::connect(&rv, r, 3, 4, T, &abort).unwrap();
                        c.share_memory(3, r != 2).unwrap();
                        assert!(!c.shares_memory());
                        c.average(StepId::new(0, 0), 3, 3, &[(r, bytes(&[r as f32; 4]))])
                            .unwrap()
                            .to_vec()
                    })
                })
                .collect();
            let mut zero = h.accept(3, 4, T, &abort).unwrap();
            zero.share_memory(3, true).unwrap();
            assert!(!zero.shares_memory());
            let avg = zero
                .average(StepId::new(0, 0), 3, 3, &[(0, bytes(&[0.0; 4]))])
                .unwrap()
                .to_vec();
            assert_eq!(avg, [1.0; 4]);
            for t in others {
                assert_eq!(t.join().unwrap(), [1.0; 4]);
            }
        });
    }

    #[test]
    fn an_offer_outside_the_shared_memory_directory_or_of_another_segment_is_refused() {
        let good =
            Offer::parse("shm1 /dev/shm/lockstep-1-00 000102030405060708090a0b0c0d0e0f").unwrap();
        assert_eq!(good.nonce[15], 15);
        for bad in [
            "shm1 /tmp/lockstep-1-00 000102030405060708090a0b0c0d0e0f",
            "shm1 /dev/shm/../etc/passwd 000102030405060708090a0b0c0d0e0f",
            "shm1 /dev/shm/other 000102030405060708090a0b0c0d0e0f",
            "shm1 /dev/shm/lockstep-1-00 0001",
            "shm2 /dev/shm/lockstep-1-00 000102030405060708090a0b0c0d0e0f",
        ] {
            assert!(Offer::parse(bad).is_err(), "{bad}");
        }
        // A segment for another layout, or with another nonce, is not taken.
        let layout = Layout::new(2, 2, 16).unwrap();
        let (_made, offer) = Segment::create(layout).unwrap();
        assert!(Segment::open(&offer, layout).is_ok());
        let err = Segment::open(&offer, Layout::new(2, 2, 17).unwrap())
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("bytes"), "{err:#}");
        let mut forged = offer.clone();
        forged.nonce[0] ^= 1;
        let err = Segment::open(&forged, layout).err().unwrap();
        assert!(
            format!("{err:#}").contains("not the segment rank 0 offered"),
            "{err:#}"
        );
    }

    #[test]
    fn a_wrong_secret_membership_or_world_is_refused_and_does_not_count() {
        for tls in [false, true] {
            wrong_connections_are_refused(tls);
        }
    }

    fn wrong_connections_are_refused(tls: bool) {
        let abort = AbortSignal::default();
        let h = host_with(tls);
        let mut wrong = h.rendezvous().clone();
        wrong.secret = Token::new("not-the-secret").unwrap();
        let mut stale = h.rendezvous().clone();
        stale.membership = 2;
        let good = h.rendezvous().clone();
        std::thread::scope(|s| {
            let zero = s.spawn(|| h.accept(2, 4, T, &abort));
            let refused = |rv: &Rendezvous, world: u32| {
                let err = TcpCollective::connect(rv, 1, world, 4, T, &abort)
                    .err()
                    .expect("refused");
                format!("{err:#}")
            };
            assert!(refused(&wrong, 2).contains("wrong secret"));
            assert!(refused(&stale, 2).contains("membership 2, this collective to membership 3"));
            assert!(refused(&good, 3).contains("expects 3 ranks"));
            let mut one = TcpCollective::connect(&good, 1, 2, 4, T, &abort).unwrap();
            let mut zero = zero.join().unwrap().unwrap();
            let id = StepId::new(0, 0);
            let t = s.spawn(move || {
                one.average(id, 2, 2, &[(1, bytes(&[1.0; 4]))])
                    .map(|a| a.to_vec())
            });
            assert_eq!(
                zero.average(id, 2, 2, &[(0, bytes(&[2.0; 4]))]).unwrap(),
                [1.5; 4]
            );
            assert_eq!(t.join().unwrap().unwrap(), vec![1.5; 4]);
        });
    }

    #[test]
    fn a_rank_that_never_connects_times_out_naming_it_and_a_pause_stops_the_wait() {
        let abort = AbortSignal::default();
        let err = host()
            .accept(3, 4, Duration::from_millis(200), &abort)
            .err()
            .expect("nobody connected");
        assert!(
            format!("{err:#}").contains("rank(s) 1, 2 did not connect"),
            "{err:#}"
        );
        abort.trip();
        let started = Instant::now();
        let err = host().accept(2, 4, T, &abort).err().expect("paused");
        assert!(crate::abort::is_interrupted(&err), "{err:#}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_tls_rank_0_refuses_plaintext_and_a_rank_refuses_another_certificate() {
        let abort = AbortSignal::default();
        let h = host_with(true);
        let good = h.rendezvous().clone();
        let mut plaintext = good.clone();
        plaintext.tls = None;
        let mut impostor = good.clone();
        impostor.tls = Some([7; 32]);
        std::thread::scope(|s| {
            let zero = s.spawn(|| h.accept(2, 4, T, &abort));
            let err = TcpCollective::connect(&plaintext, 1, 2, 4, T, &abort)
                .err()
                .expect("a plaintext rank is refused");

            assert!(
                format!("{err:#}").contains("this collective uses TLS"),
                "plaintext against TLS: {err:#}"
            );
            let err = format!(
                "{:#}",
                TcpCollective::connect(&impostor, 1, 2, 4, T, &abort)
                    .err()
                    .expect("another certificate is refused")
            );
            assert!(err.contains("the rendezvous announced 0707"), "{err}");
            // Neither attempt took rank 1's place.
            let mut one = TcpCollective::connect(&good, 1, 2, 4, T, &abort).unwrap();
            let mut zero = zero.join().unwrap().unwrap();
            let id = StepId::new(0, 0);
            let t = s.spawn(move || {
                one.average(id, 2, 2, &[(1, bytes(&[4.0; 4]))])
                    .map(|a| a.to_vec())
            });
            assert_eq!(
                zero.average(id, 2, 2, &[(0, bytes(&[2.0; 4]))]).unwrap(),
                [3.0; 4]
            );
            assert_eq!(t.join().unwrap().unwrap(), vec![3.0; 4]);
        });
    }

    /// Ranks 0 and 1 of a two-rank collective over 4 values, connected, over TLS when `tls`,
    /// sharing memory when `shm`.
    fn pair_with(abort: &AbortSignal, tls: bool, shm: bool) -> (TcpCollective, TcpCollective) {
        let h = host_with(tls);
        let rv = h.rendezvous().clone();
        std::thread::scope(|s| {
            let zero = s.spawn(move || {
                let mut c = h.accept(2, 4, T, abort).unwrap();
                c.share_memory(2, shm).unwrap();
                c
            });
            let mut one = TcpCollective::connect(&rv, 1, 2, 4, T, abort).unwrap();
            one.share_memory(2, shm).unwrap();
            let zero = zero.join().unwrap();
            assert_eq!((zero.shares_memory(), one.shares_memory()), (shm, shm));
            (zero, one)
        })
    }

    const MODES: [(bool, bool); 4] = [(false, false), (true, false), (false, true), (true, true)];

    #[test]
    fn a_non_finite_average_from_rank_0_is_refused_before_the_optimizer_sees_it() {
        let abort = AbortSignal::default();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let rendezvous = Rendezvous {
            addr: listener.local_addr().unwrap(),
            secret: Token::generate(),
            membership: 3,
            tls: None,
        };
        let id = StepId::new(0, 0);
        // A rank 0 that speaks the protocol, offers no shared memory, and answers NaN.
        let rank0 = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            read_handshake(&mut stream).unwrap();
            write_reply(&mut stream, "").unwrap();
            write_reply(&mut stream, "").unwrap();
            read_reply(&mut stream).unwrap();
            write_reply(&mut stream, "no offer").unwrap();
            let mut frame = Frame::default();
            read_frame(&mut stream, id, 4, Holds::Shards(2), &mut frame, T).unwrap();
            let poisoned = bytes(&[1.0, f32::NAN, 2.0, 3.0]);
            write_reply_frame(&mut stream, id, &poisoned, T).unwrap();
            stream
        });
        let mut one = TcpCollective::connect(&rendezvous, 1, 2, 4, T, &abort).unwrap();
        one.share_memory(2, true).unwrap();
        assert!(!one.shares_memory());
        let err = format!(
            "{:#}",
            one.average(id, 2, 2, &[(1, bytes(&[1.0; 4]))]).unwrap_err()
        );
        assert!(err.contains("rank 0 sent a malformed average"), "{err}");
        drop(rank0.join().unwrap());
    }

    #[test]
    fn a_rank_that_goes_away_fails_the_step_instead_of_hanging() {
        for (tls, shm) in MODES {
            rank_goes_away(tls, shm);
        }
    }

    fn rank_goes_away(tls: bool, shm: bool) {
        let abort = AbortSignal::default();
        let (mut zero, one) = pair_with(&abort, tls, shm);
        drop(one);
        let err = format!(
            "{:#}",
            zero.average(StepId::new(0, 0), 2, 2, &[(0, bytes(&[1.0; 4]))])
                .unwrap_err()
        );
        assert!(err.contains("receiving rank 1's shard gradients"), "{err}");
        assert!(err.contains("closed the connection"), "{err}");
    }

    #[test]
    fn a_silent_rank_times_out_and_a_pause_unblocks_the_wait_at_once() {
        for (tls, shm) in MODES {
            silent_rank(tls, shm);
        }
    }

    fn silent_rank(tls: bool, shm: bool) {
        let abort = AbortSignal::default();
        let (mut zero, _one) = pair_with(&abort, tls, shm);
        zero.set_step_timeout(Duration::from_millis(200)).unwrap();
        let started = Instant::now();
        let err = format!(
            "{:#}",
            zero.average(StepId::new(0, 0), 2, 2, &[(0, bytes(&[1.0; 4]))])
                .unwrap_err()
        );
        assert!(err.contains("sent nothing for 0.2s"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));

        let (mut zero, _one) = pair_with(&abort, tls, shm);
        let tripper = abort.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            tripper.trip();
        });
        let started = Instant::now();
        let err = zero
            .average(StepId::new(0, 0), 2, 2, &[(0, bytes(&[1.0; 4]))])
            .unwrap_err();
        assert!(!shm || crate::abort::is_interrupted(&err), "{err:#}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the 300 s step timeout was waited out"
        );
        t.join().unwrap();
    }
}

#[cfg(test)]
#[path = "tcp_props.rs"]
mod props;
