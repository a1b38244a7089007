//! Property tests of the tcp backend's decoders, which read whatever a connecting peer sends:
//! step frames, handshakes, handshake replies and the relayed rendezvous. Arbitrary bytes
//! through a `Cursor` give the message or an error, never a panic; counts and lengths are
//! checked before anything is allocated for them; valid messages round-trip.

use std::io::Cursor;

use lockstep_common::testing::{self, allocations, Probe};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;

use super::*;

/// Counts what each thread allocates, so a test can see an allocation made for a length a peer
/// only announced.
#[global_allocator]
static PROBE: Probe = Probe;

const T: Duration = Duration::from_secs(1);

/// What reading may allocate besides what the step justifies: error messages.
const SLACK_BYTES: usize = 4096;

/// What a frame holds: the shards of a step of so many (`Some`), or the average (`None`).
fn holds() -> impl Strategy<Value = Option<u32>> {
    prop_oneof![(0u32..8).prop_map(Some), Just(Some(MAX_SHARDS)), Just(None),]
}

fn as_holds(shards: Option<u32>) -> Holds {
    shards.map_or(Holds::Average, Holds::Shards)
}

/// Shards a frame of this kind may hold.
fn most(holds: Holds) -> usize {
    match holds {
        Holds::Shards(n) => n.min(MAX_SHARDS) as usize,
        Holds::Average => 0,
    }
}

/// The header of a frame of step `id` claiming `k` shards of a step of `shard_count`.
fn header(id: StepId, k: u32, shard_count: u32) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&id.epoch.to_le_bytes());
    h.extend_from_slice(&id.step.to_le_bytes());
    h.extend_from_slice(&k.to_le_bytes());
    h.extend_from_slice(&shard_count.to_le_bytes());
    h
}

/// A handshake as a connecting rank sends it.
fn hello(rank: u32, world: u32, len: u64, membership: u64, secret: &[u8]) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(&rank.to_le_bytes());
    h.extend_from_slice(&world.to_le_bytes());
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&membership.to_le_bytes());
    h.extend_from_slice(&(secret.len() as u16).to_le_bytes());
    h.extend_from_slice(secret);
    h
}

proptest! {
    #![proptest_config(testing::config(2048))]

    #[test]
    fn arbitrary_bytes_never_panic_the_frame_reader(
        id in (0u64..3, 0u64..3).prop_map(|(e, s)| StepId::new(e, s)),
        bytes in prop_oneof![
            vec(any::<u8>(), 0..256),
            // A header of the right step, then anything.
            (0u32..10, vec(any::<u8>(), 0..256)).prop_map(|(k, rest)| {
                [header(StepId::new(1, 1), k, 4), rest].concat()
            }),
        ],
        len in 0usize..16,
        holds in holds(),
    ) {
        let holds = as_holds(holds);
        let mut frame = Frame::default();
        let mut cursor = Cursor::new(&bytes[..]);
        let (read, seen) = allocations(|| read_frame(&mut cursor, id, len, holds, &mut frame, T));
        let justified = 4 * len * most(holds).max(1) + 4 * most(holds) + SLACK_BYTES;
        prop_assert!(seen.largest <= justified, "allocated {} at once", seen.largest);
        if read.is_ok() {
            let k = frame.shards.len();
            prop_assert!(k <= most(holds));
            let values = if holds == Holds::Average { len } else { len * k };
            prop_assert_eq!(frame.payload.len(), 4 * values);
            prop_assert_eq!(cursor.position() as usize, HEADER + 4 * k + 8 + 4 * values);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_handshake_reader(
        bytes in prop_oneof![
            vec(any::<u8>(), 0..128),
            vec(any::<u8>(), 0..128).prop_map(|rest| [&MAGIC[..], &rest].concat()),
        ],
    ) {
        let mut cursor = Cursor::new(&bytes[..]);
        let (read, seen) = allocations(|| read_handshake(&mut cursor));
        prop_assert!(seen.largest <= u16::MAX as usize + SLACK_BYTES);
        if let Ok(h) = read {
            prop_assert_eq!(&bytes[..8], &MAGIC[..]);
            prop_assert_eq!(cursor.position() as usize, 34 + h.secret.len());
        }
    }

    #[test]
    fn handshakes_round_trip_and_truncated_ones_are_refused(
        (rank, world, len, membership) in (any::<u32>(), any::<u32>(), any::<u64>(), any::<u64>()),
        secret in vec(any::<u8>(), 0..80),
        cut in any::<Index>(),
    ) {
        let bytes = hello(rank, world, len, membership, &secret);
        let h = read_handshake(&mut Cursor::new(&bytes[..])).unwrap();
        prop_assert_eq!((h.rank, h.world, h.len, h.membership), (rank, world, len, membership));
        prop_assert_eq!(h.secret, secret);
        let at = cut.index(bytes.len());
        prop_assert!(read_handshake(&mut Cursor::new(&bytes[..at])).is_err());
    }

    #[test]
    fn replies_round_trip_and_arbitrary_bytes_never_panic_the_reply_reader(
        text in prop_oneof![".{0,64}", (65_530usize..65_540).prop_map(|n| "x".repeat(n))],
        bytes in vec(any::<u8>(), 0..128),
    ) {
        let mut out = Vec::new();
        write_reply(&mut out, &text).unwrap();
        let back = read_reply(&mut Cursor::new(&out[..])).unwrap();
        let kept = &text.as_bytes()[..text.len().min(u16::MAX as usize)];
        // A peer's text comes back escaped, as it reaches errors and logs.
        prop_assert_eq!(back, printable(&String::from_utf8_lossy(kept)));
        let mut cursor = Cursor::new(&bytes[..]);
        if let Ok(reply) = read_reply(&mut cursor) {
            prop_assert!(reply.len() <= 10 * bytes.len());
            prop_assert!(cursor.position() >= 2);
        }
    }

    #[test]
    fn arbitrary_text_never_panics_the_rendezvous_parser(
        bytes in prop_oneof![
            vec(any::<u8>(), 0..64),
            (
                prop_oneof![Just("tcp2"), Just("tcp1"), Just("")],
                prop_oneof![
                    Just("127.0.0.1:4000".to_string()),
                    Just("[::1]:65535".to_string()),
                    "[0-9.:\\[\\]a-f]{0,24}",
                ],
                prop_oneof!["[!-~]{1,32}", ".{0,12}"],
                prop_oneof![any::<u64>().prop_map(|n| n.to_string()), "[-+0-9a-z]{0,22}"],
            )
                .prop_map(|(tag, addr, secret, membership)| {
                    format!("{tag} {addr} {secret} {membership}").into_bytes()
                }),
        ],
    ) {
        if let Ok(r) = Rendezvous::parse(&bytes) {
            prop_assert!(bytes.starts_with(b"tcp2 "));
            let again = Rendezvous::parse(&r.to_bytes()).unwrap();
            prop_assert_eq!((again.addr, again.membership), (r.addr, r.membership));
            prop_assert!(again.secret.matches(r.secret.expose().as_bytes()));
        }
    }
}

proptest! {
    #![proptest_config(testing::config(512))]

    #[test]
    fn frames_claiming_more_shards_than_the_step_has_are_refused_before_allocating(
        shard_count in 0u32..4,
        k in prop_oneof![0u32..8, (MAX_SHARDS - 1)..=(MAX_SHARDS + 1), any::<u32>()],
        size in prop_oneof![Just(None), any::<u64>().prop_map(Some)],
    ) {
        // A model of 64 KiB: a frame of 1024 of its shards would be 64 MiB.
        const LEN: usize = 16 * 1024;
        let id = StepId::new(2, 7);
        let exact = (LEN * 4) as u64 * k as u64;
        let mut bytes = header(id, k, shard_count);
        bytes.extend(vec![0u8; 4 * (k.min(8) as usize)]);
        bytes.extend_from_slice(&size.unwrap_or(exact).to_le_bytes());
        let mut frame = Frame::default();
        let (read, seen) = allocations(|| {
            read_frame(&mut Cursor::new(&bytes[..]), id, LEN, Holds::Shards(shard_count), &mut frame, T)
        });
        let justified = 4 * LEN * shard_count as usize + 4 * shard_count as usize + SLACK_BYTES;
        prop_assert!(seen.largest <= justified, "{} shards claimed: allocated {} at once", k, seen.largest);
        if k > shard_count {
            let err = format!("{:#}", read.unwrap_err());
            prop_assert!(err.contains(&format!("a frame of {k} shards")), "{}", err);
        }
    }

    #[test]
    fn valid_frames_round_trip_and_truncated_ones_are_refused(
        (id, shard_count) in ((any::<u64>(), any::<u64>()).prop_map(|(e, s)| StepId::new(e, s)), 1u32..8),
        len in 0usize..16,
        mine in vec(any::<bool>(), 8),
        seed in any::<u8>(),
        cut in any::<Index>(),
    ) {
        let own: Vec<(u32, Vec<u8>)> = (0..shard_count)
            .filter(|&s| mine[s as usize])
            .map(|s| (s, (0..4 * len).map(|i| (i as u8) ^ seed ^ s as u8).collect()))
            .collect();
        let mut bytes = Vec::new();
        write_frame(&mut bytes, id, shard_count, &own, T).unwrap();
        let mut frame = Frame::default();
        read_frame(&mut Cursor::new(&bytes[..]), id, len, Holds::Shards(shard_count), &mut frame, T).unwrap();
        prop_assert_eq!(&frame.shards, &own.iter().map(|(s, _)| *s).collect::<Vec<_>>());
        prop_assert_eq!(&frame.payload, &own.iter().flat_map(|(_, b)| b.clone()).collect::<Vec<_>>());

        let at = cut.index(bytes.len());
        let err = read_frame(&mut Cursor::new(&bytes[..at]), id, len, Holds::Shards(shard_count), &mut frame, T)
            .unwrap_err();
        prop_assert!(format!("{err:#}").contains("closed the connection"), "{:#}", err);

        let other = StepId::new(id.epoch, id.step.wrapping_add(1));
        let err = read_frame(&mut Cursor::new(&bytes[..]), other, len, Holds::Shards(shard_count), &mut frame, T)
            .unwrap_err();
        prop_assert!(format!("{err:#}").contains("out of step"), "{:#}", err);

        let average: Vec<u8> = (0..4 * len).map(|i| i as u8 ^ seed).collect();
        let mut bytes = Vec::new();
        write_reply_frame(&mut bytes, id, &average, T).unwrap();
        read_frame(&mut Cursor::new(&bytes[..]), id, len, Holds::Average, &mut frame, T).unwrap();
        prop_assert_eq!(&frame.payload, &average);
        prop_assert!(frame.shards.is_empty());
    }
}

#[test]
fn a_frame_claiming_every_shard_of_a_two_shard_step_is_refused_before_its_payload_is_allocated() {
    const LEN: usize = 16 * 1024;
    let id = StepId::new(0, 3);
    let mut bytes = header(id, MAX_SHARDS, 2);
    bytes.extend(vec![0u8; 4 * MAX_SHARDS as usize]);
    bytes.extend_from_slice(&((LEN * 4) as u64 * MAX_SHARDS as u64).to_le_bytes());
    let mut frame = Frame::default();
    let (read, seen) = allocations(|| {
        read_frame(
            &mut Cursor::new(&bytes[..]),
            id,
            LEN,
            Holds::Shards(2),
            &mut frame,
            T,
        )
    });
    let err = format!("{:#}", read.unwrap_err());
    assert!(
        err.contains("a frame of 1024 shards where at most the step's 2 was expected"),
        "{err}"
    );
    assert!(seen.largest < 1 << 20, "allocated {} at once", seen.largest);
}
