//! Property tests of the step stream's boundary: arbitrary bytes decoded with prost into the
//! generated messages, and structured messages with every field at and around its bound, are
//! converted into the project's types. A conversion never panics, refuses exactly the messages
//! that break a bound, keeps every field of those it accepts, and what it accepts converts back
//! into the same message.

use bytes::Bytes;
use proptest::collection::vec;
use proptest::prelude::*;
use prost::Message as _;

use super::*;
use crate::testing;

/// Values of a `u32` field bounded by `max`: small ones, the bound's neighbours, anything.
fn near(max: u32) -> impl Strategy<Value = u32> {
    prop_oneof![
        0u32..4,
        max.saturating_sub(1)..=max.saturating_add(1),
        Just(u32::MAX),
        any::<u32>(),
    ]
}

fn step_id() -> impl Strategy<Value = Option<pb::StepId>> {
    proptest::option::weighted(
        0.9,
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(epoch, step, membership_epoch)| {
            pb::StepId {
                epoch,
                step,
                membership_epoch,
            }
        }),
    )
}

fn sha256_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9a-f]{64}",
        "[0-9A-F]{64}",
        "[0-9a-f]{63}",
        "[0-9a-f]{65}",
        "[0-9a-g]{64}",
        ".{0,70}",
    ]
}

fn blob() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        vec(any::<u8>(), 0..64).prop_map(Bytes::from),
        (MAX_RENDEZVOUS_BYTES - 1..=MAX_RENDEZVOUS_BYTES + 1)
            .prop_map(|n| Bytes::from(vec![7u8; n])),
    ]
}

fn reason() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,40}",
        (MAX_REASON_BYTES - 4..MAX_REASON_BYTES + 8).prop_map(|n| "r".repeat(n)),
        (MAX_REASON_BYTES / 2 - 3..MAX_REASON_BYTES / 2 + 3).prop_map(|n| "é".repeat(n)),
        (MAX_REASON_BYTES / 3 - 2..MAX_REASON_BYTES / 3 + 3).prop_map(|n| "€".repeat(n)),
    ]
}

fn worker_message() -> impl Strategy<Value = pb::WorkerMessage> {
    use pb::worker_message::Kind;
    let shard_done = (near(MAX_SHARDS), near(MAX_GLOBAL_BATCH), any::<u64>()).prop_map(
        |(shard, samples, indices_digest)| pb::ShardDone {
            shard,
            samples,
            indices_digest,
        },
    );
    let shards = prop_oneof![
        vec(shard_done, 0..6),
        // Distinct, in bounds, many: around the count bound.
        (MAX_SHARDS as usize..=MAX_SHARDS as usize + 1).prop_map(|n| {
            (0..n as u32)
                .map(|shard| pb::ShardDone {
                    shard: shard % (MAX_SHARDS + 1),
                    samples: 1,
                    indices_digest: 0,
                })
                .collect()
        }),
    ];
    let kind = prop_oneof![
        any::<u64>().prop_map(|member| Kind::Hello(pb::Hello { member })),
        Just(Kind::Heartbeat(pb::Heartbeat {})),
        (
            step_id(),
            (
                near(MAX_SHARDS),
                near(MAX_GLOBAL_BATCH),
                near(MAX_GLOBAL_BATCH)
            ),
            any::<f64>(),
            vec(any::<u8>(), 0..32),
            (any::<f32>(), any::<f32>(), any::<f32>()),
            any::<u64>()
        )
            .prop_map(
                |(
                    id,
                    (shard, samples, correct),
                    loss_sum,
                    data,
                    (compute_ms, wait_ms, apply_ms),
                    indices_digest,
                )| {
                    Kind::Gradient(pb::ShardGradient {
                        id,
                        shard,
                        samples,
                        loss_sum,
                        correct,
                        data: data.into(),
                        compute_ms,
                        indices_digest,
                        wait_ms,
                        apply_ms,
                    })
                }
            ),
        (step_id(), sha256_text()).prop_map(|(id, sha256)| Kind::Digest(pb::Digest { id, sha256 })),
        (blob(), any::<u64>()).prop_map(|(id, membership_epoch)| {
            Kind::Rendezvous(pb::Rendezvous {
                id,
                membership_epoch,
            })
        }),
        (
            step_id(),
            shards,
            (near(MAX_GLOBAL_BATCH * 64), near(MAX_GLOBAL_BATCH * 64)),
            any::<f64>(),
            (any::<f32>(), any::<f32>(), any::<f32>())
        )
            .prop_map(
                |(id, shards, (samples, correct), loss_sum, (compute_ms, wait_ms, apply_ms))| {
                    Kind::StepDone(pb::StepDone {
                        id,
                        shards,
                        samples,
                        loss_sum,
                        correct,
                        compute_ms,
                        wait_ms,
                        apply_ms,
                    })
                }
            ),
        (step_id(), sha256_text())
            .prop_map(|(next, sha256)| Kind::Paused(pb::Paused { next, sha256 })),
        (step_id(), reason(), any::<bool>()).prop_map(|(id, reason, diverged)| {
            Kind::StepFailed(pb::StepFailed {
                id,
                reason,
                diverged,
            })
        }),
    ];
    proptest::option::weighted(0.95, kind).prop_map(|kind| pb::WorkerMessage { kind })
}

fn shard(shard_count: u32) -> impl Strategy<Value = pb::Shard> {
    // Mostly consistent shards, each length sometimes off by one, a label sometimes out of range.
    let skew = || prop_oneof![8 => Just(0isize), 1 => Just(-1isize), 1 => Just(1isize)];
    (
        prop_oneof![4 => 0..shard_count.saturating_add(1), 1 => near(MAX_SHARDS)],
        0u32..4,
        (skew(), skew(), skew()),
        prop_oneof![8 => 0u8..=9, 1 => 10u8..=255],
    )
        .prop_map(|(index, count, (pixels, labels, indices), label)| {
            let n = count as usize;
            let len = |base: usize, skew: isize| base.saturating_add_signed(skew);
            pb::Shard {
                index,
                count,
                pixels: Bytes::from(vec![0u8; len(n * IMAGE_PIXELS, pixels)]),
                labels: Bytes::from(vec![label; len(n, labels)]),
                indices: Bytes::from(vec![0u8; len(4 * n, indices)]),
            }
        })
}

fn coordinator_message() -> impl Strategy<Value = pb::CoordinatorMessage> {
    use pb::coordinator_message::Kind;
    let work = (near(MAX_SHARDS), 0u32..8).prop_flat_map(|(shard_count, small)| {
        let shard_count = if small > 0 { small } else { shard_count };
        (
            step_id(),
            prop_oneof![0u32..16, near(MAX_GLOBAL_BATCH)],
            Just(shard_count),
            (vec(shard(shard_count), 0..5), any::<bool>()),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(
                |(id, global_count, shard_count, (mut shards, tidy), last_of_epoch, push_state)| {
                    if tidy {
                        // In shard order, as a coordinator sends them.
                        shards.sort_by_key(|s| s.index);
                        shards.dedup_by_key(|s| s.index);
                    }
                    Kind::Work(pb::Work {
                        id,
                        global_count,
                        shard_count,
                        shards,
                        last_of_epoch,
                        push_state,
                    })
                },
            )
    });
    let kind = prop_oneof![
        4 => work,
        1 => (step_id(), vec(any::<u8>(), 0..32)).prop_map(|(id, data)| {
            Kind::Reduced(pb::Reduced { id, data: data.into() })
        }),
        1 => reason().prop_map(|message| Kind::Finish(pb::Finish { message })),
        1 => reason().prop_map(|reason| Kind::Abort(pb::Abort { reason })),
        1 => (blob(), any::<u64>()).prop_map(|(id, membership_epoch)| {
            Kind::Rendezvous(pb::Rendezvous { id, membership_epoch })
        }),
        1 => any::<u64>().prop_map(|state_version| Kind::PushState(pb::StateRequest { state_version })),
        1 => any::<u64>().prop_map(|membership_epoch| Kind::Pause(pb::Pause { membership_epoch })),
        2 => (any::<u64>(), near(MAX_SHARDS), near(MAX_SHARDS), any::<u64>()).prop_map(
            |(membership_epoch, rank, world, state_version)| {
                Kind::Configure(pb::Configure { membership_epoch, rank, world, state_version })
            }
        ),
    ];
    proptest::option::weighted(0.95, kind).prop_map(|kind| pb::CoordinatorMessage { kind })
}

/// Whether `msg` keeps every bound the conversion promises (the rules, stated once more
/// independently of the code under test).
fn worker_message_is_in_bounds(msg: &pb::WorkerMessage) -> bool {
    use pb::worker_message::Kind;
    let sha = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    match &msg.kind {
        None => false,
        Some(Kind::Hello(_) | Kind::Heartbeat(_)) => true,
        Some(Kind::Gradient(g)) => {
            g.id.is_some()
                && g.shard < MAX_SHARDS
                && g.samples <= MAX_GLOBAL_BATCH
                && g.correct <= g.samples
        }
        Some(Kind::Digest(d)) => d.id.is_some() && sha(&d.sha256),
        Some(Kind::Paused(p)) => p.next.is_some() && sha(&p.sha256),
        Some(Kind::Rendezvous(r)) => (1..=MAX_RENDEZVOUS_BYTES).contains(&r.id.len()),
        Some(Kind::StepDone(d)) => {
            let mut seen = std::collections::BTreeSet::new();
            d.id.is_some()
                && d.shards.len() <= MAX_SHARDS as usize
                && d.shards.iter().all(|s| {
                    s.shard < MAX_SHARDS && s.samples <= MAX_GLOBAL_BATCH && seen.insert(s.shard)
                })
                && d.samples <= MAX_GLOBAL_BATCH * 64
                && d.correct <= d.samples
        }
        Some(Kind::StepFailed(f)) => f.id.is_some() && f.reason.len() <= MAX_REASON_BYTES,
    }
}

/// Whether `msg` keeps every bound the conversion promises.
fn coordinator_message_is_in_bounds(msg: &pb::CoordinatorMessage) -> bool {
    use pb::coordinator_message::Kind;
    match &msg.kind {
        None => false,
        Some(Kind::Work(w)) => {
            let shards_ok = w.shards.iter().all(|s| {
                let n = s.count as usize;
                s.index < w.shard_count
                    && s.pixels.len() == n * IMAGE_PIXELS
                    && s.labels.len() == n
                    && s.indices.len() == 4 * n
                    && s.labels.iter().all(|&l| l <= 9)
            });
            let increasing = w.shards.windows(2).all(|p| p[0].index < p[1].index);
            let total: u64 = w.shards.iter().map(|s| s.count as u64).sum();
            w.id.is_some()
                && (1..=MAX_SHARDS).contains(&w.shard_count)
                && w.global_count <= MAX_GLOBAL_BATCH
                && shards_ok
                && increasing
                && total <= w.global_count as u64
        }
        Some(Kind::Reduced(r)) => r.id.is_some(),
        Some(Kind::Rendezvous(r)) => (1..=MAX_RENDEZVOUS_BYTES).contains(&r.id.len()),
        Some(Kind::Finish(f)) => f.message.len() <= MAX_REASON_BYTES,
        Some(Kind::Abort(a)) => a.reason.len() <= MAX_REASON_BYTES,
        Some(Kind::PushState(_) | Kind::Pause(_)) => true,
        Some(Kind::Configure(c)) => c.world >= 1 && c.rank < c.world && c.world <= MAX_SHARDS,
    }
}

/// A peer's text is kept whole, with anything unprintable escaped.
fn is_kept_from(got: &str, original: &str) -> bool {
    original.len() <= MAX_REASON_BYTES && got == printable(original)
}

/// Checks a converted worker message against its source: every field kept (text escaped as
/// promised), and the conversion back gives a message that converts to the same thing (for
/// text that needed no escaping: escaping twice escapes the escapes).
fn check_worker(msg: &pb::WorkerMessage, converted: &FromWorker) -> Result<(), TestCaseError> {
    use pb::worker_message::Kind;
    match (&msg.kind, converted) {
        (Some(Kind::StepFailed(f)), FromWorker::StepFailed { reason, .. }) => {
            prop_assert!(is_kept_from(reason, &f.reason), "{} bytes", reason.len());
            if *reason != f.reason {
                return Ok(());
            }
        }
        (Some(Kind::Heartbeat(_)), _) => {}
        (Some(_), c) => {
            // Everything else is kept whole.
            prop_assert_eq!(&pb::WorkerMessage::from(c.clone()), msg);
        }
        (None, _) => prop_assert!(false, "a message without a kind was accepted"),
    }
    let again = FromWorker::try_from(pb::WorkerMessage::from(converted.clone()));
    prop_assert_eq!(again.as_ref(), Ok(converted));
    Ok(())
}

fn check_coordinator(
    msg: &pb::CoordinatorMessage,
    converted: &FromCoordinator,
) -> Result<(), TestCaseError> {
    use pb::coordinator_message::Kind;
    match (&msg.kind, converted) {
        (Some(Kind::Finish(f)), FromCoordinator::Finish(m)) => {
            prop_assert!(is_kept_from(m, &f.message));
            if *m != f.message {
                return Ok(());
            }
        }
        (Some(Kind::Abort(a)), FromCoordinator::Abort(r)) => {
            prop_assert!(is_kept_from(r, &a.reason));
            if *r != a.reason {
                return Ok(());
            }
        }
        (Some(Kind::Configure(c)), FromCoordinator::Configure(got)) => {
            prop_assert_eq!(
                (got.membership, got.rank, got.world),
                (c.membership_epoch, c.rank, c.world)
            );
            prop_assert_eq!(
                got.state_version,
                (c.state_version != 0).then_some(c.state_version)
            );
        }
        (Some(_), c) => prop_assert_eq!(&pb::CoordinatorMessage::from(c.clone()), msg),
        (None, _) => prop_assert!(false, "a message without a kind was accepted"),
    }
    let again = FromCoordinator::try_from(pb::CoordinatorMessage::from(converted.clone()));
    prop_assert_eq!(again.as_ref(), Ok(converted));
    Ok(())
}

proptest! {
    #![proptest_config(testing::config(2048))]

    #[test]
    fn structured_worker_messages_are_accepted_exactly_within_their_bounds(msg in worker_message()) {
        match FromWorker::try_from(msg.clone()) {
            Ok(converted) => {
                prop_assert!(worker_message_is_in_bounds(&msg), "accepted {:?}", msg);
                check_worker(&msg, &converted)?;
            }
            Err(e) => {
                prop_assert!(!worker_message_is_in_bounds(&msg), "refused ({}) {:?}", e, msg);
                prop_assert!(!e.to_string().is_empty());
            }
        }
    }

    #[test]
    fn structured_coordinator_messages_are_accepted_exactly_within_their_bounds(msg in coordinator_message()) {
        match FromCoordinator::try_from(msg.clone()) {
            Ok(converted) => {
                prop_assert!(coordinator_message_is_in_bounds(&msg), "accepted {:?}", msg);
                check_coordinator(&msg, &converted)?;
            }
            Err(e) => {
                prop_assert!(!coordinator_message_is_in_bounds(&msg), "refused ({}) {:?}", e, msg);
                prop_assert!(!e.to_string().is_empty());
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_step_stream_decoders(
        bytes in prop_oneof![
            vec(any::<u8>(), 0..256),
            // Valid messages with a few bytes flipped: past the first tag, into the fields.
            (worker_message(), vec((any::<prop::sample::Index>(), any::<u8>()), 1..4))
                .prop_map(|(m, flips)| flip(m.encode_to_vec(), &flips)),
            (coordinator_message(), vec((any::<prop::sample::Index>(), any::<u8>()), 1..4))
                .prop_map(|(m, flips)| flip(m.encode_to_vec(), &flips)),
        ],
    ) {
        if let Ok(msg) = pb::WorkerMessage::decode(&bytes[..]) {
            if let Ok(converted) = FromWorker::try_from(msg.clone()) {
                prop_assert!(worker_message_is_in_bounds(&msg), "accepted {:?}", msg);
                check_worker(&msg, &converted)?;
            }
        }
        if let Ok(msg) = pb::CoordinatorMessage::decode(&bytes[..]) {
            if let Ok(converted) = FromCoordinator::try_from(msg.clone()) {
                prop_assert!(coordinator_message_is_in_bounds(&msg), "accepted {:?}", msg);
                check_coordinator(&msg, &converted)?;
            }
        }
    }
}

fn flip(mut bytes: Vec<u8>, flips: &[(prop::sample::Index, u8)]) -> Vec<u8> {
    if !bytes.is_empty() {
        for (at, mask) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= mask;
        }
    }
    bytes
}

#[test]
fn a_cut_reason_is_within_the_bound_and_cut_no_further_when_relayed_again() {
    for text in [
        "r".repeat(MAX_REASON_BYTES + 2),
        "é".repeat(MAX_REASON_BYTES),
    ] {
        let once = cut_reason(text);
        assert!(once.len() <= MAX_REASON_BYTES, "{} bytes", once.len());
        assert!(once.ends_with("..."));
        assert_eq!(cut_reason(once.clone()), once);
    }
}
