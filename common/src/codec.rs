//! Flat buffers: every replica keeps its parameters, gradients and optimizer state as one
//! contiguous `f32` buffer in a layout (names, shapes, offsets) agreed at join time. This module
//! holds that layout and the little-endian byte codec the wire uses.

use sha2::{Digest, Sha256};
use thiserror::Error;

/// One named tensor inside a flat buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// PyTorch-compatible name, e.g. `fc1.weight`.
    pub name: String,
    /// Shape, PyTorch order (`[out, in]` for a linear weight).
    pub shape: Vec<usize>,
    /// Element offset of the first value in the flat buffer.
    pub offset: usize,
}

impl TensorSpec {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True for a tensor with no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element range this tensor occupies in the flat buffer.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// Builds a layout from names and shapes, packing tensors back to back in order.
pub fn pack_layout(named_shapes: &[(&str, Vec<usize>)]) -> Vec<TensorSpec> {
    let mut offset = 0;
    named_shapes
        .iter()
        .map(|(name, shape)| {
            let spec = TensorSpec {
                name: name.to_string(),
                shape: shape.clone(),
                offset,
            };
            offset += spec.len();
            spec
        })
        .collect()
}

/// Total number of elements of a layout.
pub fn layout_len(layout: &[TensorSpec]) -> usize {
    layout.iter().map(|s| s.offset + s.len()).max().unwrap_or(0)
}

/// A flat buffer that does not fit the agreed layout.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CodecError {
    /// The byte length is not a whole number of `f32`s.
    #[error("buffer of {0} bytes is not a whole number of 4-byte floats")]
    Ragged(usize),
    /// The buffer holds a different number of values than the layout.
    #[error("buffer holds {got} values, the layout has {expected}")]
    WrongLength {
        /// Values the layout expects.
        expected: usize,
        /// Values received.
        got: usize,
    },
    /// A value is NaN or infinite.
    #[error("buffer holds a non-finite value at index {0}")]
    NonFinite(usize),
}

/// Encodes `values` as little-endian `f32` bytes, appending to `out`.
pub fn encode_f32_into(values: &[f32], out: &mut Vec<u8>) {
    out.clear();
    if cfg!(target_endian = "little") {
        out.extend_from_slice(bytemuck::cast_slice(values));
    } else {
        out.reserve(values.len() * 4);
        for v in values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// `values` as little-endian `f32` bytes to send: the values' own memory on a little-endian
/// machine (no copy), an encoded copy elsewhere.
pub fn f32_le_bytes(values: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        std::borrow::Cow::Borrowed(bytemuck::cast_slice(values))
    } else {
        std::borrow::Cow::Owned(encode_f32(values))
    }
}

/// Encodes `values` as little-endian `f32` bytes.
pub fn encode_f32(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    encode_f32_into(values, &mut out);
    out
}

/// Checks that `bytes` hold exactly `expected` little-endian `f32`s.
fn check_len(bytes: &[u8], expected: usize) -> Result<(), CodecError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(CodecError::Ragged(bytes.len()));
    }
    if bytes.len() / 4 != expected {
        return Err(CodecError::WrongLength {
            expected,
            got: bytes.len() / 4,
        });
    }
    Ok(())
}

/// Decodes little-endian `f32` bytes into `out`, which must already have the expected length.
pub fn decode_f32_into(bytes: &[u8], out: &mut [f32]) -> Result<(), CodecError> {
    check_len(bytes, out.len())?;
    if cfg!(target_endian = "little") {
        // One memcpy into the (aligned) destination; the source may be unaligned.
        bytemuck::cast_slice_mut::<f32, u8>(out).copy_from_slice(bytes);
    } else {
        for (dst, src) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *dst = f32::from_le_bytes([src[0], src[1], src[2], src[3]]);
        }
    }
    Ok(())
}

/// The values of little-endian `f32` bytes: the bytes themselves when they are suitably
/// aligned (no copy), else decoded into `scratch`, which must have the expected length.
pub fn f32_view<'a>(bytes: &'a [u8], scratch: &'a mut [f32]) -> Result<&'a [f32], CodecError> {
    if cfg!(target_endian = "little") && bytes.len() == scratch.len() * 4 {
        if let Ok(view) = bytemuck::try_cast_slice::<u8, f32>(bytes) {
            return Ok(view);
        }
    }
    decode_f32_into(bytes, scratch)?;
    Ok(scratch)
}

/// Adds little-endian `f32` bytes element-wise into `acc` (the reducer's inner loop, without
/// an intermediate decoded copy).
pub fn add_f32_bytes(acc: &mut [f32], bytes: &[u8]) -> Result<(), CodecError> {
    check_len(bytes, acc.len())?;
    // `try_into` rather than indexing the chunk: the loop then vectorises.
    for (a, b) in acc.iter_mut().zip(bytes.chunks_exact(4)) {
        *a += f32::from_le_bytes(b.try_into().expect("chunks of 4 bytes"));
    }
    Ok(())
}

/// Decodes little-endian `f32` bytes that must hold exactly `expected` values.
pub fn decode_f32(bytes: &[u8], expected: usize) -> Result<Vec<f32>, CodecError> {
    // Checked before allocating: `expected` values are allocated only if the bytes hold them.
    check_len(bytes, expected)?;
    let mut out = vec![0.0; expected];
    decode_f32_into(bytes, &mut out)?;
    Ok(out)
}

/// Fails on a NaN or infinity: a poisoned gradient must not reach the optimizer.
pub fn check_finite(values: &[f32]) -> Result<(), CodecError> {
    // Branch-free scan (non-finite means all exponent bits set) that the compiler vectorises;
    // the slow search for the index runs only when something is wrong.
    const EXPONENT: u32 = 0x7f80_0000;
    let any = values.iter().fold(0u32, |acc, v| {
        acc | u32::from(v.to_bits() & EXPONENT == EXPONENT)
    });
    if any == 0 {
        return Ok(());
    }
    let i = values.iter().position(|v| !v.is_finite()).unwrap_or(0);
    Err(CodecError::NonFinite(i))
}

/// [`check_finite`] of little-endian `f32` bytes, read in place at any alignment.
pub fn check_finite_le(bytes: &[u8]) -> Result<(), CodecError> {
    const EXPONENT: u32 = 0x7f80_0000;
    let bits = |c: &[u8]| u32::from_le_bytes(c.try_into().expect("chunks of 4 bytes"));
    let any = bytes.chunks_exact(4).fold(0u32, |acc, c| {
        acc | u32::from(bits(c) & EXPONENT == EXPONENT)
    });
    if any == 0 {
        return Ok(());
    }
    let i = bytes
        .chunks_exact(4)
        .position(|c| bits(c) & EXPONENT == EXPONENT)
        .unwrap_or(0);
    Err(CodecError::NonFinite(i))
}

/// SHA-256 of a set of flat buffers, hex; replicas compare it to catch silent divergence.
pub fn digest(buffers: &[&[f32]]) -> String {
    let mut h = Sha256::new();
    for b in buffers {
        h.update((b.len() as u64).to_le_bytes());
        h.update(bytemuck::cast_slice::<f32, u8>(b));
    }
    hex::encode(h.finalize())
}

/// Digest of a replica's whole training state: its parameters and every optimizer buffer.
pub fn state_digest(params: &[f32], optimizer: &crate::optim::OptimizerState) -> String {
    let mut buffers: Vec<&[f32]> = vec![params];
    buffers.extend(optimizer.buffers.iter().map(|(_, b)| b.as_slice()));
    digest(&buffers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_le_bytes_match_the_encoder() {
        let values = [1.5f32, -0.0, f32::MAX, 3e-39];
        assert_eq!(&*f32_le_bytes(&values), encode_f32(&values).as_slice());
        assert_eq!(decode_f32(&f32_le_bytes(&values), 4).unwrap(), values);
    }

    #[test]
    fn round_trip_is_bit_exact() {
        let values = vec![
            0.0,
            -0.0,
            1.5,
            -3.25e-12,
            f32::MAX,
            f32::MIN_POSITIVE,
            7.0e20,
        ];
        let bytes = encode_f32(&values);
        assert_eq!(bytes.len(), values.len() * 4);
        assert_eq!(&bytes[8..12], &1.5f32.to_le_bytes());
        let back = decode_f32(&bytes, values.len()).unwrap();
        let a: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
        let b: Vec<u32> = back.iter().map(|v| v.to_bits()).collect();
        assert_eq!(a, b);
    }

    #[test]
    fn wrong_sizes_are_refused() {
        assert_eq!(decode_f32(&[0u8; 7], 2), Err(CodecError::Ragged(7)));
        assert_eq!(
            decode_f32(&[0u8; 8], 3),
            Err(CodecError::WrongLength {
                expected: 3,
                got: 2
            })
        );
        assert_eq!(
            check_finite(&[1.0, f32::NAN]),
            Err(CodecError::NonFinite(1))
        );
        let mut unaligned = vec![0u8];
        unaligned.extend_from_slice(&encode_f32(&[1.0, 2.0, f32::INFINITY]));
        assert_eq!(
            check_finite_le(&unaligned[1..]),
            Err(CodecError::NonFinite(2))
        );
        assert_eq!(check_finite_le(&unaligned[1..9]), Ok(()));
    }

    #[test]
    fn views_and_sums_read_the_bytes_directly() {
        let values = [1.0f32, -2.5, 3.25];
        let bytes = encode_f32(&values);
        let mut scratch = [0.0f32; 3];
        assert_eq!(f32_view(&bytes, &mut scratch).unwrap(), &values);
        // An unaligned view falls back to decoding.
        let mut shifted = vec![0u8; 1];
        shifted.extend_from_slice(&bytes);
        assert_eq!(f32_view(&shifted[1..], &mut scratch).unwrap(), &values);
        let mut acc = [1.0f32, 1.0, 1.0];
        add_f32_bytes(&mut acc, &bytes).unwrap();
        assert_eq!(acc, [2.0, -1.5, 4.25]);
        assert!(add_f32_bytes(&mut acc, &bytes[..8]).is_err());
    }

    #[test]
    fn layout_packs_back_to_back() {
        let l = pack_layout(&[("a.weight", vec![3, 4]), ("a.bias", vec![3])]);
        assert_eq!(l[1].offset, 12);
        assert_eq!(layout_len(&l), 15);
        assert_eq!(l[0].range(), 0..12);
    }

    #[test]
    fn digest_changes_with_any_bit() {
        let a = [1.0f32, 2.0];
        let b = [1.0f32, 2.000_000_2];
        assert_ne!(digest(&[&a]), digest(&[&b]));
        assert_eq!(digest(&[&a]), digest(&[&a]));
    }
}

#[cfg(test)]
mod props;
