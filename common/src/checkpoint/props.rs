//! Property tests of the checkpoint reader (what `--resume` reads from a run directory, and what
//! a worker fetches or uploads as its state) against hostile bytes: arbitrary files, truncated
//! and mutated checkpoints, huge declared header lengths, tensors of the wrong shape or dtype,
//! and metadata out of range. Whatever the bytes, the reader returns a state that fits the
//! layout or an error that names what is wrong, never panics, and allocates no more than the
//! file's own size justifies.

use std::collections::HashMap;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use safetensors::tensor::{Dtype, TensorView};

use super::*;
use crate::codec::pack_layout;
use crate::testing::{self, allocations};

/// What reading may allocate besides what the file's size justifies: the parsed header's maps.
const SLACK_BYTES: usize = 64 * 1024;

fn small_layout() -> Vec<TensorSpec> {
    pack_layout(&[("fc.weight", vec![3, 4]), ("fc.bias", vec![3])])
}

/// Random training states of `len` parameters, with Adam's buffers or none, and extras.
fn state(len: usize) -> impl Strategy<Value = (TrainingState, Extras)> {
    (
        vec(any::<f32>(), len),
        any::<u64>(),
        any::<bool>(),
        (any::<u64>(), any::<u64>()),
        proptest::option::of(".{0,40}"),
        proptest::option::of(vec(any::<u8>(), 0..64)),
    )
        .prop_map(
            move |(params, step, adam, (epoch, at), progress, coverage)| {
                let buffers = if adam {
                    vec![
                        (
                            "exp_avg".to_string(),
                            params.iter().map(|v| v * 0.5).collect(),
                        ),
                        (
                            "exp_avg_sq".to_string(),
                            params.iter().map(|v| v * v).collect(),
                        ),
                    ]
                } else {
                    Vec::new()
                };
                let state = TrainingState {
                    params,
                    optimizer: OptimizerState { step, buffers },
                    position: Position { epoch, step: at },
                };
                (state, Extras { progress, coverage })
            },
        )
}

/// A valid checkpoint of the small layout.
fn checkpoint() -> impl Strategy<Value = Vec<u8>> {
    state(15).prop_map(|(state, extras)| {
        state
            .to_bytes_with(&small_layout(), "seed = 1", &extras)
            .expect("a state of the layout serialises")
    })
}

/// Bit-for-bit equality of f32 buffers (NaN payloads included).
fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Reads `bytes` as a checkpoint of `layout`, checking that an accepted state fits the layout and
/// that reading allocated no more than the file's size justifies.
fn read_checked(
    layout: &[TensorSpec],
    bytes: &[u8],
) -> Result<Result<(TrainingState, String, Extras)>, TestCaseError> {
    let (read, seen) = allocations(|| TrainingState::from_bytes_with(layout, bytes));
    let len = crate::codec::layout_len(layout);
    // Each value is decoded once and copied once; nothing is allocated for what a header only
    // claims.
    let justified = 3 * bytes.len() + 8 * len + SLACK_BYTES;
    prop_assert!(
        seen.total <= justified,
        "reading {} bytes allocated {} in all (at most {} justified)",
        bytes.len(),
        seen.total,
        justified
    );
    if let Ok((state, _, _)) = &read {
        prop_assert_eq!(state.params.len(), len);
        for (name, buffer) in &state.optimizer.buffers {
            prop_assert_eq!(buffer.len(), len, "optimizer buffer {}", name);
        }
    }
    Ok(read)
}

/// A safetensors file of `tensors` (name, dtype, shape, data) and `meta`.
fn safetensors_file(
    tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)],
    meta: HashMap<String, String>,
) -> Vec<u8> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            let view = TensorView::new(*dtype, shape.clone(), data).expect("data fits the shape");
            (name.clone(), view)
        })
        .collect();
    safetensors::serialize(views, Some(meta)).expect("serialises")
}

fn valid_meta() -> HashMap<String, String> {
    [
        ("format", "lockstep-checkpoint-v1"),
        ("epoch", "1"),
        ("step", "2"),
        ("optimizer_step", "3"),
        ("optimizer_buffers", ""),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn f32_tensor(name: &str, len: usize) -> (String, Dtype, Vec<usize>, Vec<u8>) {
    (name.to_string(), Dtype::F32, vec![len], vec![0u8; 4 * len])
}

/// Text for a numeric metadata field: numbers in and out of `u64`, and anything else.
fn number_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        Just("18446744073709551616".to_string()),
        Just("1e3".to_string()),
        Just(String::new()),
        ".{0,12}",
    ]
}

proptest! {
    #![proptest_config(testing::config(1024))]

    #[test]
    fn arbitrary_bytes_never_panic_the_checkpoint_reader(
        bytes in prop_oneof![
            vec(any::<u8>(), 0..1024),
            // A plausible header length, then anything.
            (0u64..2048, vec(any::<u8>(), 0..1024)).prop_map(|(n, rest)| {
                [&n.to_le_bytes()[..], &rest].concat()
            }),
            // A JSON header of arbitrary text.
            ".{0,200}".prop_map(|text| {
                let header = format!("{{\"__metadata__\":{{\"format\":\"lockstep-checkpoint-v1\"}},{text}}}");
                [&(header.len() as u64).to_le_bytes()[..], header.as_bytes()].concat()
            }),
        ],
    ) {
        let _ = read_checked(&small_layout(), &bytes)?;
    }
}

proptest! {
    #![proptest_config(testing::config(256))]

    #[test]
    fn valid_checkpoints_round_trip_bit_for_bit((state, extras) in state(15)) {
        let bytes = state.to_bytes_with(&small_layout(), "seed = 1", &extras).unwrap();
        let (back, config, got) = read_checked(&small_layout(), &bytes)?.unwrap();
        prop_assert!(same_bits(&back.params, &state.params));
        prop_assert_eq!(back.position, state.position);
        prop_assert_eq!(back.optimizer.step, state.optimizer.step);
        prop_assert_eq!(back.optimizer.buffers.len(), state.optimizer.buffers.len());
        prop_assert_eq!((config, got), ("seed = 1".to_string(), extras));
    }

    #[test]
    fn truncated_checkpoints_are_refused(bytes in checkpoint(), cut in any::<Index>()) {
        let at = cut.index(bytes.len());
        prop_assert!(read_checked(&small_layout(), &bytes[..at])?.is_err(), "{} of {} bytes", at, bytes.len());
    }

    #[test]
    fn mutated_checkpoints_are_refused_or_fit_the_layout(
        mut bytes in checkpoint(),
        flips in vec((any::<Index>(), 1u8..=255), 1..8),
    ) {
        for (at, mask) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= mask;
        }
        let _ = read_checked(&small_layout(), &bytes)?;
    }

    #[test]
    fn huge_declared_header_lengths_are_refused_before_allocating(
        declared in prop_oneof![any::<u64>(), (1u64 << 20)..(1u64 << 40), (u64::MAX - 16)..=u64::MAX],
        rest in vec(any::<u8>(), 0..256),
    ) {
        let bytes = [&declared.to_le_bytes()[..], &rest].concat();
        let (read, seen) = allocations(|| TrainingState::from_bytes_with(&small_layout(), &bytes));
        prop_assert!(read.is_err());
        prop_assert!(seen.largest <= 4096, "allocated {} bytes at once", seen.largest);
    }

    #[test]
    fn tensors_of_the_wrong_shape_or_dtype_are_refused_naming_them(
        dtype in prop::sample::select(vec![Dtype::F32, Dtype::F64, Dtype::F16, Dtype::BF16, Dtype::I32, Dtype::U8, Dtype::BOOL]),
        shape in prop_oneof![Just(vec![3usize, 4]), vec(0usize..6, 0..4)],
    ) {
        let n: usize = shape.iter().product();
        let weight = ("fc.weight".to_string(), dtype, shape.clone(), vec![0u8; n * dtype.bitsize() / 8]);
        let bytes = safetensors_file(&[weight, f32_tensor("fc.bias", 3)], valid_meta());
        let read = read_checked(&small_layout(), &bytes)?;
        if dtype == Dtype::F32 && shape == [3, 4] {
            prop_assert!(read.is_ok());
        } else {
            let err = format!("{:#}", read.unwrap_err());
            prop_assert!(err.contains("`fc.weight`") && err.contains("F32 [3, 4]"), "{}", err);
        }
    }

    #[test]
    fn metadata_out_of_range_is_refused_naming_the_field(
        epoch in number_text(),
        step in number_text(),
        optimizer_step in number_text(),
        names in vec(prop::sample::select(vec!["exp_avg", "exp_avg_sq", "momentum", "", "missing"]), 0..6),
        repeat in 1usize..64,
    ) {
        // A model large enough that reading a buffer twice would show: 16 KiB a tensor.
        const LEN: usize = 4096;
        let layout = pack_layout(&[("fc.bias", vec![LEN])]);
        let mut listed: Vec<&str> = names.clone();
        if listed.len() == 1 {
            listed = vec![listed[0]; repeat];
        }
        let mut meta = valid_meta();
        meta.insert("epoch".into(), epoch.clone());
        meta.insert("step".into(), step.clone());
        meta.insert("optimizer_step".into(), optimizer_step.clone());
        meta.insert("optimizer_buffers".into(), listed.join(","));
        let mut tensors = vec![f32_tensor("fc.bias", LEN)];
        for name in ["exp_avg", "exp_avg_sq", "momentum"] {
            tensors.push(f32_tensor(&format!("optimizer.{name}"), LEN));
        }
        let bytes = safetensors_file(&tensors, meta);
        let read = read_checked(&layout, &bytes)?;

        let given: Vec<&str> = listed.iter().copied().filter(|n| !n.is_empty()).collect();
        let distinct: std::collections::BTreeSet<&str> = given.iter().copied().collect();
        let numbers_ok = [&epoch, &step, &optimizer_step].iter().all(|t| t.parse::<u64>().is_ok());
        let names_ok = distinct.len() == given.len() && !distinct.contains("missing");
        match read {
            Ok((state, _, _)) => {
                prop_assert!(numbers_ok && names_ok);
                prop_assert_eq!(Some(state.position.epoch), epoch.parse().ok());
                prop_assert_eq!(Some(state.position.step), step.parse().ok());
                prop_assert_eq!(Some(state.optimizer.step), optimizer_step.parse().ok());
                let got: Vec<&str> = state.optimizer.buffers.iter().map(|(n, _)| n.as_str()).collect();
                prop_assert_eq!(got, given);
            }
            Err(e) => {
                prop_assert!(!(numbers_ok && names_ok), "a good checkpoint was refused: {:#}", e);
                let err = format!("{e:#}");
                prop_assert!(
                    err.contains("optimizer_buffers") || err.contains("optimizer.missing")
                        || ["`epoch`", "`step`", "`optimizer_step`"].iter().any(|f| err.contains(f)),
                    "{}", err
                );
            }
        }
    }
}

#[test]
fn an_optimizer_buffer_named_twice_is_refused_without_reading_it_again() {
    const LEN: usize = 1 << 16;
    let layout = pack_layout(&[("fc.bias", vec![LEN])]);
    let mut meta = valid_meta();
    meta.insert(
        "optimizer_buffers".into(),
        vec!["exp_avg"; 10_000].join(","),
    );
    let bytes = safetensors_file(
        &[
            f32_tensor("fc.bias", LEN),
            f32_tensor("optimizer.exp_avg", LEN),
        ],
        meta,
    );
    let (read, seen) = allocations(|| TrainingState::from_bytes_with(&layout, &bytes));
    let err = format!("{:#}", read.unwrap_err());
    assert!(err.contains("names `exp_avg` more than once"), "{err}");
    assert!(
        seen.total < 4 * bytes.len(),
        "a {}-byte file made the reader allocate {} bytes",
        bytes.len(),
        seen.total
    );
}
