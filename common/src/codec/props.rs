//! Property tests of the flat-buffer codec, which reads every gradient and average a peer
//! sends: buffers of any length, at any alignment, holding any bit pattern decode to exactly
//! their values or are refused with the length they had, and the finiteness checks find the
//! first NaN or infinity wherever it is.

use proptest::collection::vec;
use proptest::prelude::*;

use super::*;
use crate::testing;

/// `bytes` placed `shift` bytes into a fresh buffer, so that the view is misaligned for `f32`
/// whenever `shift` is not a multiple of 4.
fn shifted(bytes: &[u8], shift: usize) -> Vec<u8> {
    let mut buf = vec![0u8; shift];
    buf.extend_from_slice(bytes);
    buf
}

/// What `bytes` must decode to when `expected` values are wanted.
fn reference(bytes: &[u8], expected: usize) -> Result<Vec<u32>, CodecError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(CodecError::Ragged(bytes.len()));
    }
    if bytes.len() / 4 != expected {
        return Err(CodecError::WrongLength {
            expected,
            got: bytes.len() / 4,
        });
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// Floats with the special values well represented.
fn float() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => any::<f32>(),
        1 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => Just(f32::NEG_INFINITY),
        1 => Just(-0.0f32),
        1 => Just(f32::from_bits(0x7f80_0001)),
    ]
}

proptest! {
    #![proptest_config(testing::config(2048))]

    #[test]
    fn any_bytes_decode_to_their_values_or_are_refused_with_their_length(
        raw in prop_oneof![
            vec(any::<u8>(), 0..256),
            vec(float(), 0..64).prop_map(|v| le_bytes(&v).into_owned()),
        ],
        expected in prop_oneof![0usize..80, Just(usize::MAX)],
        shift in 0usize..4,
    ) {
        let buf = shifted(&raw, shift);
        let bytes = &buf[shift..];
        // `expected` is the caller's, but a decoder must not allocate it before it knows the
        // bytes hold that many values.
        match (tensor_from_le(bytes, expected, &Device::Cpu), reference(bytes, expected)) {
            (Ok(t), Ok(values)) => prop_assert_eq!(bits(&t.to_vec1::<f32>().unwrap()), values),
            // Behind candle's error, which may carry a backtrace after it.
            (Err(got), Err(want)) => prop_assert!(got.to_string().starts_with(&want.to_string())),
            (got, want) => prop_assert!(false, "{:?} vs {:?}", got.map(|_| ()), want),
        }
        prop_assert_eq!(le_f32s(bytes).map(|v| bits(&v)), reference(bytes, bytes.len() / 4));
        let small = expected.min(1 << 10);
        let mut out = vec![0.0f32; small];
        prop_assert_eq!(le_f32s_into(bytes, &mut out).map(|()| bits(&out)), reference(bytes, small));

        let mut acc = vec![1.0f32; small];
        match (add_le_f32s(&mut acc, bytes), reference(bytes, small)) {
            (Ok(()), Ok(values)) => {
                for (sum, &b) in acc.iter().zip(&values) {
                    let want = 1.0 + f32::from_bits(b);
                    // NaN payloads may differ between the vectorised loop and this one.
                    prop_assert!(sum.to_bits() == want.to_bits() || (sum.is_nan() && want.is_nan()));
                }
            }
            (got, want) => prop_assert_eq!(got, want.map(|_| ())),
        }
    }

    #[test]
    fn the_finiteness_checks_find_the_first_non_finite_value_at_any_alignment(
        values in vec(float(), 0..64),
        shift in 0usize..4,
    ) {
        let want = || match values.iter().position(|v| !v.is_finite()) {
            Some(i) => Err(CodecError::NonFinite(i)),
            None => Ok(()),
        };
        prop_assert_eq!(check_finite(&values), want());
        let buf = shifted(&le_bytes(&values), shift);
        prop_assert_eq!(check_finite_le(&buf[shift..]), want());
    }

    #[test]
    fn encoding_round_trips_every_bit_pattern(values in vec(float(), 0..64)) {
        let mut bytes = Vec::new();
        put_le_f32s(&values, &mut bytes);
        prop_assert_eq!(&*le_bytes(&values), &bytes[..]);
        prop_assert_eq!(bits(&le_f32s(&bytes).unwrap()), bits(&values));
        prop_assert_eq!(le_f32_iter(&bytes).map(f32::to_bits).collect::<Vec<_>>(), bits(&values));
    }
}
