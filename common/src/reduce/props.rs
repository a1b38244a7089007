//! Property tests of the shard-order average, which the grpc coordinator and the tcp backend's
//! rank 0 run on gradients from peers: parts of the wrong length, ragged, misaligned or holding
//! NaN or infinity are refused naming the first bad part, sums that overflow are refused, and
//! everything else gives the sum in shard order divided by the sample count, bit for bit.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;

use super::*;
use crate::codec::le_bytes;
use crate::testing;

/// One shard's buffer as a peer might send it.
#[derive(Clone, Debug)]
enum Part {
    /// `len` values.
    Good(Vec<f32>),
    /// Whole floats, but not `len` of them.
    Short(usize),
    Long(usize),
    /// Not a whole number of floats.
    Ragged(usize),
    /// `len` values with a non-finite one at an index.
    Poisoned(Vec<f32>, Index, f32),
}

fn part(len: usize) -> impl Strategy<Value = Part> {
    let value = prop_oneof![
        8 => -1.0e3f32..1.0e3,
        1 => Just(f32::MAX),
        1 => Just(-f32::MAX),
    ];
    let values = vec(value, len);
    prop_oneof![
        6 => values.clone().prop_map(Part::Good),
        1 => (1usize..=len.max(1)).prop_map(Part::Short),
        1 => (1usize..4).prop_map(Part::Long),
        1 => (1usize..4).prop_map(Part::Ragged),
        2 => (
            values,
            any::<Index>(),
            prop::sample::select(vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY])
        )
            .prop_map(|(v, i, bad)| Part::Poisoned(v, i, bad)),
    ]
}

/// The bytes of `part` for a layout of `len` values.
fn encode(part: &Part, len: usize) -> Vec<u8> {
    match part {
        Part::Good(v) => le_bytes(v).into_owned(),
        Part::Short(less) => vec![0u8; 4 * len.saturating_sub(*less)],
        Part::Long(more) => vec![0u8; 4 * (len + more)],
        Part::Ragged(extra) => vec![0u8; 4 * len + extra],
        Part::Poisoned(v, i, bad) => {
            let mut v = v.clone();
            if !v.is_empty() {
                let at = i.index(v.len());
                v[at] = *bad;
            }
            le_bytes(&v).into_owned()
        }
    }
}

/// What the average of `parts` must be: the first part of the wrong length, else the first
/// non-finite part, else an overflowing sum, is refused; else the shard-order sum over `samples`.
fn reference(parts: &[Vec<u8>], samples: u32, len: usize) -> Result<Vec<u32>, Malformed> {
    for (part, bytes) in parts.iter().enumerate() {
        if !bytes.len().is_multiple_of(4) {
            let error = CodecError::Ragged(bytes.len());
            return Err(Malformed { part, error });
        }
        if bytes.len() != 4 * len {
            let error = CodecError::WrongLength {
                expected: len,
                got: bytes.len() / 4,
            };
            return Err(Malformed { part, error });
        }
    }
    let values: Vec<Vec<f32>> = parts
        .iter()
        .map(|b| {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
        .collect();
    for (part, v) in values.iter().enumerate() {
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            let error = CodecError::NonFinite(i);
            return Err(Malformed { part, error });
        }
    }
    let mut sum = vec![0.0f32; len];
    for v in &values {
        for (s, x) in sum.iter_mut().zip(v) {
            *s += x;
        }
    }
    if let Some(i) = sum.iter().position(|x| !x.is_finite()) {
        let part = parts.len().saturating_sub(1);
        return Err(Malformed {
            part,
            error: CodecError::NonFinite(i),
        });
    }
    let n = samples.max(1) as f32;
    Ok(sum.iter().map(|s| (s / n).to_bits()).collect())
}

proptest! {
    #![proptest_config(testing::config(2048))]

    #[test]
    fn the_shard_order_average_refuses_exactly_the_malformed_parts(
        // Short layouts, and ones across the reducer's 2048-value chunks.
        (len, parts) in prop_oneof![4 => 0usize..12, 1 => 2040usize..4200]
            .prop_flat_map(|len| (Just(len), vec(part(len), 0..6))),
        samples in prop_oneof![Just(0u32), 1u32..1000, Just(u32::MAX), (0u32..32).prop_map(|k| 1 << k)],
        shifts in vec(0usize..4, 6),
    ) {
        let encoded: Vec<Vec<u8>> = parts.iter().map(|p| encode(p, len)).collect();
        // Each part at its own alignment, as the bytes of a decoded message land.
        let buffers: Vec<Vec<u8>> = encoded
            .iter()
            .zip(&shifts)
            .map(|(b, &s)| [vec![0u8; s], b.clone()].concat())
            .collect();
        let views: Vec<&[u8]> = buffers.iter().zip(&shifts).map(|(b, &s)| &b[s..]).collect();
        let mut out = vec![7.0f32; len];
        let got = average_in_shard_order(&views, samples, &mut out).map(|()| {
            out.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
        });
        prop_assert_eq!(got, reference(&encoded, samples, len));
    }
}
