//! Flat buffers: every replica keeps its parameters, gradients and optimizer state as one
//! contiguous `f32` buffer in a layout (names, shapes, offsets) agreed at join time. This module
//! holds that layout and the little-endian byte codec that the wire, the checkpoints and the
//! tensors on their way to either all use: values to bytes ([`put_le_f32s`], [`le_bytes`],
//! [`encode_tensor_into`]) and bytes to values ([`le_f32s`], [`le_f32s_into`],
//! [`le_f32_iter`], [`add_le_f32s`], [`tensor_from_le`]), read in place at any alignment.

use std::borrow::Cow;

use candle_core::{Device, Shape, Storage, Tensor};
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

/// Appends `values` to `out` as little-endian `f32` bytes: one memcpy on a little-endian
/// machine.
pub fn put_le_f32s(values: &[f32], out: &mut Vec<u8>) {
    if cfg!(target_endian = "little") {
        out.extend_from_slice(bytemuck::cast_slice(values));
    } else {
        out.reserve(values.len() * 4);
        for v in values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// Writes `values` into `out` as little-endian `f32` bytes; `out` must hold exactly that many.
pub fn write_le_f32s(values: &[f32], out: &mut [u8]) -> Result<(), CodecError> {
    check_le_len(out, values.len())?;
    if cfg!(target_endian = "little") {
        out.copy_from_slice(bytemuck::cast_slice(values));
    } else {
        for (dst, v) in out.chunks_exact_mut(4).zip(values) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
    }
    Ok(())
}

/// `values` as little-endian `f32` bytes: the values' own memory on a little-endian machine
/// (no copy), an encoded copy elsewhere. `.into_owned()` when a buffer of its own is needed.
pub fn le_bytes(values: &[f32]) -> Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        Cow::Borrowed(bytemuck::cast_slice(values))
    } else {
        let mut out = Vec::with_capacity(values.len() * 4);
        put_le_f32s(values, &mut out);
        Cow::Owned(out)
    }
}

/// Checks that `bytes` hold exactly `expected` little-endian `f32`s.
pub fn check_le_len(bytes: &[u8], expected: usize) -> Result<(), CodecError> {
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

/// The values of little-endian `f32` bytes; a length that is not a whole number of floats is
/// refused.
pub fn le_f32s(bytes: &[u8]) -> Result<Vec<f32>, CodecError> {
    let mut out = vec![0.0; bytes.len() / 4];
    le_f32s_into(bytes, &mut out)?;
    Ok(out)
}

/// Decodes little-endian `f32` bytes into `out`, which they must fill exactly (else nothing is
/// written and the lengths are reported).
pub fn le_f32s_into(bytes: &[u8], out: &mut [f32]) -> Result<(), CodecError> {
    check_le_len(bytes, out.len())?;
    if cfg!(target_endian = "little") {
        // One memcpy into the (aligned) destination; the source may be unaligned.
        bytemuck::cast_slice_mut::<f32, u8>(out).copy_from_slice(bytes);
    } else {
        for (dst, v) in out.iter_mut().zip(le_f32_iter(bytes)) {
            *dst = v;
        }
    }
    Ok(())
}

/// The bit patterns of little-endian 4-byte words, read in place at any alignment. `try_into`
/// rather than indexing the chunk: loops over it then vectorise. A trailing partial word is
/// not read; callers check the length first.
fn le_words(bytes: &[u8]) -> impl Iterator<Item = u32> + Clone + '_ {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("chunks of 4 bytes")))
}

/// The values of little-endian `f32` bytes one by one, read in place at any alignment, for
/// loops that consume a message's bytes without an aligned copy (the optimizer's step, the
/// reducer's sum). A trailing partial value is not read: check the length first.
pub fn le_f32_iter(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    le_words(bytes).map(f32::from_bits)
}

/// Adds little-endian `f32` bytes element-wise into `acc` (the reducer's inner loop, without
/// an intermediate decoded copy).
pub fn add_le_f32s(acc: &mut [f32], bytes: &[u8]) -> Result<(), CodecError> {
    check_le_len(bytes, acc.len())?;
    for (a, v) in acc.iter_mut().zip(le_f32_iter(bytes)) {
        *a += v;
    }
    Ok(())
}

/// Fails on a NaN or infinity: a poisoned gradient must not reach the optimizer.
pub fn check_finite(values: &[f32]) -> Result<(), CodecError> {
    first_non_finite(values.iter().map(|v| v.to_bits()))
}

/// [`check_finite`] of little-endian `f32` bytes, read in place at any alignment.
pub fn check_finite_le(bytes: &[u8]) -> Result<(), CodecError> {
    first_non_finite(le_words(bytes))
}

/// The index of the first non-finite value among `f32` bit patterns, as an error.
fn first_non_finite(mut bits: impl Iterator<Item = u32> + Clone) -> Result<(), CodecError> {
    // Branch-free scan (non-finite means all exponent bits set) that the compiler vectorises;
    // the slow search for the index runs only when something is wrong.
    const EXPONENT: u32 = 0x7f80_0000;
    let any = bits
        .clone()
        .fold(0u32, |acc, b| acc | u32::from(b & EXPONENT == EXPONENT));
    if any == 0 {
        return Ok(());
    }
    let i = bits.position(|b| b & EXPONENT == EXPONENT).unwrap_or(0);
    Err(CodecError::NonFinite(i))
}

/// Runs `f` on a CPU tensor's `f32` values, read in place when the tensor is contiguous (a
/// contiguous copy first otherwise); a tensor on another device is an error.
pub fn with_cpu_f32s<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(candle_core::Error::Msg(format!(
            "a tensor on {:?} read as a CPU one",
            t.device().location()
        )));
    };
    let start = layout.start_offset();
    Ok(f(&cpu.as_slice::<f32>()?[start..start + t.elem_count()]))
}

/// Appends a tensor's values to `out` as little-endian `f32` bytes: a CPU tensor straight from
/// its storage, another device's through one copy to the host.
pub fn encode_tensor_into(t: &Tensor, out: &mut Vec<u8>) -> candle_core::Result<()> {
    if t.device().is_cpu() {
        with_cpu_f32s(t, |values| put_le_f32s(values, out))
    } else {
        put_le_f32s(&t.flatten_all()?.to_vec1::<f32>()?, out);
        Ok(())
    }
}

/// A tensor of `shape` on `device` from little-endian `f32` bytes that must fill it exactly.
pub fn tensor_from_le(
    bytes: &[u8],
    shape: impl Into<Shape>,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let shape = shape.into();
    // Checked before allocating: the shape is the caller's, the bytes a peer's.
    check_le_len(bytes, shape.elem_count()).map_err(candle_core::Error::wrap)?;
    let values = le_f32s(bytes).map_err(candle_core::Error::wrap)?;
    Tensor::from_vec(values, shape, device)
}

/// SHA-256 of a set of flat buffers, hex; replicas compare it to catch silent divergence.
pub fn digest(buffers: &[&[f32]]) -> String {
    let mut h = Sha256::new();
    for b in buffers {
        h.update((b.len() as u64).to_le_bytes());
        h.update(le_bytes(b));
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

    /// `values` encoded into a buffer of their own.
    fn encoded(values: &[f32]) -> Vec<u8> {
        le_bytes(values).into_owned()
    }

    #[test]
    fn the_borrowed_bytes_match_the_appended_ones() {
        let values = [1.5f32, -0.0, f32::MAX, 3e-39];
        let mut out = vec![9u8];
        put_le_f32s(&values, &mut out);
        assert_eq!(out[0], 9, "appended, not overwritten");
        assert_eq!(&*le_bytes(&values), &out[1..]);
        assert_eq!(le_f32s(&le_bytes(&values)).unwrap(), values);
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
        let bytes = encoded(&values);
        assert_eq!(bytes.len(), values.len() * 4);
        assert_eq!(&bytes[8..12], &1.5f32.to_le_bytes());
        let back = le_f32s(&bytes).unwrap();
        let a: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
        let b: Vec<u32> = back.iter().map(|v| v.to_bits()).collect();
        assert_eq!(a, b);
    }

    #[test]
    fn wrong_sizes_are_refused() {
        assert_eq!(le_f32s(&[0u8; 7]), Err(CodecError::Ragged(7)));
        assert_eq!(le_f32s(&[0u8; 1]), Err(CodecError::Ragged(1)));
        assert_eq!(le_f32s(&[]), Ok(vec![]));
        let mut out = [5.0f32; 3];
        assert_eq!(
            le_f32s_into(&[0u8; 8], &mut out),
            Err(CodecError::WrongLength {
                expected: 3,
                got: 2
            })
        );
        assert_eq!(out, [5.0; 3], "nothing written");
        assert_eq!(
            le_f32s_into(&[0u8; 13], &mut out),
            Err(CodecError::Ragged(13))
        );
        assert_eq!(
            check_finite(&[1.0, f32::NAN]),
            Err(CodecError::NonFinite(1))
        );
        let mut unaligned = vec![0u8];
        unaligned.extend_from_slice(&encoded(&[1.0, 2.0, f32::INFINITY]));
        assert_eq!(
            check_finite_le(&unaligned[1..]),
            Err(CodecError::NonFinite(2))
        );
        assert_eq!(check_finite_le(&unaligned[1..9]), Ok(()));
    }

    #[test]
    fn sums_and_iterations_read_unaligned_bytes_in_place() {
        let values = [1.0f32, -2.5, 3.25];
        let mut shifted = vec![0u8; 1];
        shifted.extend_from_slice(&encoded(&values));
        let bytes = &shifted[1..];
        assert_eq!(le_f32_iter(bytes).collect::<Vec<_>>(), values);
        let mut out = [0.0f32; 3];
        le_f32s_into(bytes, &mut out).unwrap();
        assert_eq!(out, values);
        let mut acc = [1.0f32, 1.0, 1.0];
        add_le_f32s(&mut acc, bytes).unwrap();
        assert_eq!(acc, [2.0, -1.5, 4.25]);
        assert_eq!(
            add_le_f32s(&mut acc, &bytes[..8]),
            Err(CodecError::WrongLength {
                expected: 3,
                got: 2
            })
        );
        assert_eq!(acc, [2.0, -1.5, 4.25], "a refused buffer adds nothing");
    }

    #[test]
    fn tensors_round_trip_through_the_same_bytes() {
        let values = [0.5f32, -1.0, 2.0, f32::MIN_POSITIVE, 7.0, -0.0];
        let t = Tensor::from_slice(&values, (2, 3), &Device::Cpu).unwrap();
        let mut out = vec![1u8, 2];
        encode_tensor_into(&t, &mut out).unwrap();
        assert_eq!(&out[2..], &*le_bytes(&values));
        // A strided view is encoded in its logical order.
        let mut transposed = Vec::new();
        encode_tensor_into(&t.t().unwrap(), &mut transposed).unwrap();
        assert_eq!(
            le_f32s(&transposed).unwrap(),
            [0.5, f32::MIN_POSITIVE, -1.0, 7.0, 2.0, -0.0]
        );
        let back = tensor_from_le(&out[2..], (3, 2), &Device::Cpu).unwrap();
        assert_eq!(back.dims(), [3, 2]);
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            values
        );
        let short = tensor_from_le(&out[2..], (4, 2), &Device::Cpu).unwrap_err();
        assert!(
            short
                .to_string()
                .starts_with("buffer holds 6 values, the layout has 8"),
            "{short}"
        );
        assert_eq!(
            with_cpu_f32s(&t.narrow(1, 1, 2).unwrap(), <[f32]>::to_vec).unwrap(),
            [-1.0, 2.0, 7.0, -0.0]
        );
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
