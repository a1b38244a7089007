//! The gradient average of a step: the shard gradients added **in shard order**, starting from
//! zero, then divided by the global sample count. Floating-point addition is not associative,
//! so a sum in arrival order (or in the order of whichever workers happen to be members) would
//! make two runs with the same seed differ; a sum over a fixed number of shards in a fixed order
//! makes every run of a job — with 1, 2 or 3 workers, or with workers lost and replaced —
//! bit-identical. The grpc coordinator and the tcp backend's rank 0 both run this function, so
//! the two backends agree bit for bit too.

use crate::codec::{self, CodecError};

/// A shard gradient that could not be reduced, and which shard it was.
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed {
    /// Index (into the parts) of the refused buffer.
    pub part: usize,
    /// What was wrong with it.
    pub error: CodecError,
}

/// Averages the shards' summed gradients: `(0 + g_0 + g_1 + ... + g_{n-1}) / samples`, added in
/// that order. `parts[k]` is shard `k`'s buffer (little-endian `f32` bytes); `out` receives the
/// average and must have the layout's length.
pub fn average_in_shard_order(
    parts: &[&[u8]],
    samples: u32,
    out: &mut [f32],
) -> Result<(), Malformed> {
    for (part, bytes) in parts.iter().enumerate() {
        codec::check_le_len(bytes, out.len()).map_err(|error| Malformed { part, error })?;
    }
    // One pass over memory, a cache-sized chunk at a time: every element still gets exactly
    // `((0 + g_0) + g_1 + ...) / samples`, the same operations in the same order as a pass
    // per shard, so the same bits.
    const CHUNK: usize = 2048;
    let n = samples.max(1) as f32;
    // Dividing by a power of two is multiplying by its inverse, which is exact: the same
    // correctly rounded result, bit for bit (subnormals included), at a fraction of a
    // division's cost. Global batches of 64 hit this path.
    let exact_inverse = samples
        .max(1)
        .is_power_of_two()
        .then(|| 1.0 / n)
        .filter(|inverse| inverse.is_normal());
    let mut finite = true;
    for (c, acc) in out.chunks_mut(CHUNK).enumerate() {
        let bytes = c * CHUNK * 4..(c * CHUNK + acc.len()) * 4;
        acc.fill(0.0);
        for part in parts {
            for (a, v) in acc.iter_mut().zip(codec::le_f32_iter(&part[bytes.clone()])) {
                *a += v;
            }
        }
        // Non-finite after dividing by `n >= 1` exactly when the sum was.
        if let Some(inverse) = exact_inverse {
            for a in acc.iter_mut() {
                *a *= inverse;
            }
        } else {
            for a in acc.iter_mut() {
                *a /= n;
            }
        }
        finite &= codec::check_finite(acc).is_ok();
    }
    if !finite {
        // Only now look for the culprit.
        let mut scratch = vec![0.0f32; out.len()];
        for (part, bytes) in parts.iter().enumerate() {
            codec::le_f32s_into(bytes, &mut scratch).map_err(|error| Malformed { part, error })?;
            codec::check_finite(&scratch).map_err(|error| Malformed { part, error })?;
        }
        // Every part is finite but their sum overflowed; blame the last part added.
        return Err(Malformed {
            part: parts.len().saturating_sub(1),
            error: codec::check_finite(out).expect_err("a non-finite value"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::le_bytes;

    fn bytes_of(values: &[f32]) -> Vec<u8> {
        le_bytes(values).into_owned()
    }

    #[test]
    fn sums_in_shard_order_whatever_the_arrival_order() {
        // 1e8 + 1 - 1e8 in f32: shard order gives (1e8 + 1) - 1e8 = 0, another order gives 1.
        let a = bytes_of(&[1.0e8, 2.0]);
        let b = bytes_of(&[1.0, 4.0]);
        let c = bytes_of(&[-1.0e8, 6.0]);
        let mut out = [0.0f32; 2];
        average_in_shard_order(&[&a, &b, &c], 2, &mut out).unwrap();
        assert_eq!(out, [((1.0e8f32 + 1.0) - 1.0e8) / 2.0, 6.0]);
        assert_eq!(out[0], 0.0);
        let mut other = [0.0f32; 2];
        average_in_shard_order(&[&a, &c, &b], 2, &mut other).unwrap();
        assert_eq!(
            other[0], 0.5,
            "a different order really gives a different sum"
        );
    }

    #[test]
    fn malformed_parts_are_named() {
        let good = bytes_of(&[1.0, 2.0]);
        let short = bytes_of(&[1.0]);
        let nan = bytes_of(&[f32::NAN, 0.0]);
        let mut out = [0.0f32; 2];
        let e = average_in_shard_order(&[&good, &short], 2, &mut out).unwrap_err();
        assert_eq!(e.part, 1);
        let e = average_in_shard_order(&[&nan, &good], 2, &mut out).unwrap_err();
        assert_eq!(
            e,
            Malformed {
                part: 0,
                error: CodecError::NonFinite(0)
            }
        );
    }
}

#[cfg(test)]
mod props;
