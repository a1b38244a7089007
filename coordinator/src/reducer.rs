//! The gRPC-mode reducer: sums the ranks' gradient buffers **in rank order** and divides by
//! the global sample count. Floating-point addition is not associative, so a sum in arrival
//! order would make two runs with the same seed differ; rank order makes them bit-identical.

use lockstep_common::codec::{self, CodecError};

/// A gradient buffer that could not be reduced, and which rank sent it.
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed {
    /// The rank whose buffer was refused.
    pub rank: usize,
    /// What was wrong with it.
    pub error: CodecError,
}

/// Averages the ranks' summed gradients: `(g_0 + g_1 + ... + g_{n-1}) / samples`, added in
/// that order. `parts[r]` is rank `r`'s buffer (little-endian `f32` bytes); `out` receives the
/// average and must have the layout's length.
pub fn average_in_rank_order(
    parts: &[&[u8]],
    samples: u32,
    out: &mut [f32],
) -> Result<(), Malformed> {
    out.fill(0.0);
    for (rank, part) in parts.iter().enumerate() {
        codec::add_f32_bytes(out, part).map_err(|error| Malformed { rank, error })?;
    }
    // A finite sum means every part was finite; only on failure look for the culprit.
    if let Err(sum_error) = codec::check_finite(out) {
        let mut scratch = vec![0.0f32; out.len()];
        for (rank, part) in parts.iter().enumerate() {
            codec::decode_f32_into(part, &mut scratch)
                .map_err(|error| Malformed { rank, error })?;
            codec::check_finite(&scratch).map_err(|error| Malformed { rank, error })?;
        }
        // Every part is finite but their sum overflowed; blame the last rank added.
        return Err(Malformed {
            rank: parts.len().saturating_sub(1),
            error: sum_error,
        });
    }
    let n = samples.max(1) as f32;
    for v in out.iter_mut() {
        *v /= n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_common::codec::encode_f32;

    #[test]
    fn sums_in_rank_order_whatever_the_arrival_order() {
        // 1e8 + 1 - 1e8 in f32: rank order gives (1e8 + 1) - 1e8 = 0, another order gives 1.
        let a = encode_f32(&[1.0e8, 2.0]);
        let b = encode_f32(&[1.0, 4.0]);
        let c = encode_f32(&[-1.0e8, 6.0]);
        let mut out = [0.0f32; 2];
        average_in_rank_order(&[&a, &b, &c], 2, &mut out).unwrap();
        assert_eq!(out, [((1.0e8f32 + 1.0) - 1.0e8) / 2.0, 6.0]);
        assert_eq!(out[0], 0.0);
        let mut other = [0.0f32; 2];
        average_in_rank_order(&[&a, &c, &b], 2, &mut other).unwrap();
        assert_eq!(
            other[0], 0.5,
            "a different order really gives a different sum"
        );
    }

    #[test]
    fn malformed_parts_name_their_rank() {
        let good = encode_f32(&[1.0, 2.0]);
        let short = encode_f32(&[1.0]);
        let nan = encode_f32(&[f32::NAN, 0.0]);
        let mut out = [0.0f32; 2];
        let e = average_in_rank_order(&[&good, &short], 2, &mut out).unwrap_err();
        assert_eq!(e.rank, 1);
        let e = average_in_rank_order(&[&nan, &good], 2, &mut out).unwrap_err();
        assert_eq!(
            e,
            Malformed {
                rank: 0,
                error: CodecError::NonFinite(0)
            }
        );
    }
}
