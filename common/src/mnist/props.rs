//! Property tests of the MNIST decoders against hostile files: whatever the bytes, the IDX
//! parser, the gzip reader and the per-file checks return the data or an error that says what
//! is wrong, never panic, and never inflate a stream past what the file can hold.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;

use super::tests::{gzip, idx};
use super::*;
use crate::testing::{self, allocations};

/// What inflating may allocate besides its output: the decoder's window and state.
const DECODER_BYTES: usize = 256 * 1024;

/// Dimensions of a small IDX file and its data.
fn valid_idx() -> impl Strategy<Value = (Vec<u32>, Vec<u8>)> {
    vec(0u32..7, 1..=4).prop_flat_map(|dims| {
        let n = dims.iter().product::<u32>() as usize;
        (Just(dims), vec(any::<u8>(), n))
    })
}

/// Arbitrary bytes, half of them behind a valid unsigned-byte magic so that the parser gets
/// past its first check.
fn idx_like_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..512),
        (1u8..=4, vec(any::<u8>(), 0..64)).prop_map(|(ndims, rest)| {
            let mut bytes = vec![0, 0, 8, ndims];
            bytes.extend(rest);
            bytes
        }),
    ]
}

fn header_len(dims: &[u32]) -> usize {
    4 + 4 * dims.len()
}

proptest! {
    #![proptest_config(testing::config(1024))]

    #[test]
    fn arbitrary_bytes_never_panic_the_idx_parser(bytes in idx_like_bytes()) {
        if let Ok(array) = parse_idx(&bytes) {
            prop_assert_eq!(array.dims.iter().product::<usize>(), array.data.len());
            prop_assert_eq!(&bytes[4 + 4 * array.dims.len()..], &array.data[..]);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_gzip_reader(
        bytes in prop_oneof![
            vec(any::<u8>(), 0..512),
            vec(any::<u8>(), 0..512).prop_map(|rest| [&[0x1f, 0x8b, 8][..], &rest].concat()),
        ],
        limit in 0usize..1024,
    ) {
        match maybe_gunzip(bytes.clone(), limit) {
            Ok(out) if bytes.starts_with(&[0x1f, 0x8b]) => prop_assert!(out.len() <= limit),
            Ok(out) => prop_assert_eq!(out, bytes),
            Err(e) => prop_assert!(matches!(e, IdxError::Gzip(_) | IdxError::TooLarge(_))),
        }
    }
}

proptest! {
    #![proptest_config(testing::config(512))]

    #[test]
    fn truncated_idx_files_are_refused_raw_or_gzip(
        (dims, data) in valid_idx(),
        cut in any::<Index>(),
    ) {
        let file = idx(&dims, &data);
        let at = cut.index(file.len());
        prop_assert!(parse_idx(&file[..at]).is_err(), "{} of {} bytes", at, file.len());
        let gz = gzip(&file);
        let at = cut.index(gz.len());
        let read = maybe_gunzip(gz[..at].to_vec(), file.len()).and_then(|b| parse_idx(&b));
        prop_assert!(read.is_err(), "{} of {} gzip bytes", at, gz.len());
    }

    #[test]
    fn bit_flipped_idx_headers_are_refused_or_describe_their_data(
        (dims, data) in valid_idx(),
        bit in any::<Index>(),
    ) {
        let mut file = idx(&dims, &data);
        let bit = bit.index(8 * header_len(&dims));
        file[bit / 8] ^= 1 << (bit % 8);
        match parse_idx(&file) {
            Ok(array) => {
                prop_assert_eq!(array.dims.iter().product::<usize>(), array.data.len());
                prop_assert!(bit / 8 >= 3, "a flip in the type bytes must be refused");
            }
            Err(IdxError::BadMagic(magic)) => prop_assert_eq!(&magic[..], &file[..4]),
            Err(IdxError::WrongSize { expected, got }) => prop_assert_ne!(expected, got),
            Err(IdxError::NoHeader(len)) => prop_assert_eq!(len, file.len()),
            Err(e) => prop_assert!(false, "unexpected error {}", e),
        }
    }

    #[test]
    fn wrong_magic_is_refused_naming_its_bytes(
        magic in any::<[u8; 4]>()
            .prop_filter("not an unsigned-byte IDX magic", |m| m[..3] != [0, 0, 8] || !(1..=4).contains(&m[3])),
        rest in vec(any::<u8>(), 0..64),
    ) {
        let bytes = [&magic[..], &rest].concat();
        let err = parse_idx(&bytes).unwrap_err();
        prop_assert!(matches!(err, IdxError::BadMagic(m) if m == magic));
        prop_assert!(err.to_string().contains(&format!("{magic:02x?}")), "{}", err);
    }

    #[test]
    fn files_of_the_wrong_dimensions_or_content_are_refused_naming_the_file(
        (dims, data) in valid_idx(),
        file in 0..FILES.len(),
        gzipped in any::<bool>(),
    ) {
        let f = &FILES[file];
        let raw = idx(&dims, &data);
        let bytes = if gzipped { gzip(&raw) } else { raw };
        let path = Path::new("/data/mnist").join(f.name);
        let err = format!("{:#}", decode_file(&path, bytes, f).unwrap_err());
        prop_assert!(err.contains("/data/mnist"), "{}", err);
        // Every generated file is smaller than the smallest MNIST file, and of other dimensions.
        let dims: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
        prop_assert!(err.contains(&format!("dimensions {dims:?}, expected {:?}", f.dims)), "{}", err);
    }
}

proptest! {
    #![proptest_config(testing::config(48))]

    #[test]
    fn gzip_streams_are_inflated_no_further_than_the_limit(
        header in valid_idx(),
        pattern in vec(any::<u8>(), 1..32),
        len in 0usize..(2 << 20),
        limit in 0usize..(64 << 10),
    ) {
        // An IDX header followed by `len` bytes of a short pattern: streams that inflate to far
        // more than their header announces, and compress to almost nothing.
        let mut file = idx(&header.0, &header.1);
        file.extend(pattern.iter().cycle().take(len));
        let gz = gzip(&file);
        let (read, seen) = allocations(|| maybe_gunzip(gz, limit));
        if file.len() <= limit {
            prop_assert_eq!(read.unwrap(), file);
        } else {
            prop_assert!(matches!(read, Err(IdxError::TooLarge(l)) if l == limit));
        }
        prop_assert!(
            seen.largest <= 2 * (limit + 1) + DECODER_BYTES,
            "inflating to a limit of {} bytes allocated {} at once", limit, seen.largest
        );
    }
}

#[test]
fn a_gzip_bomb_is_refused_before_it_is_inflated() {
    // A labels file that announces 10,000 labels and inflates to 64 MiB.
    let mut bomb = idx(&[10_000], &[]);
    bomb.resize(64 << 20, 0);
    let gz = gzip(&bomb);
    assert!(gz.len() < 1 << 20, "{} bytes", gz.len());
    let labels = &FILES[3];
    let (read, seen) = allocations(|| maybe_gunzip(gz.clone(), labels.idx_len()));
    let err = read.unwrap_err();
    assert!(matches!(err, IdxError::TooLarge(10_008)), "{err}");
    assert!(err.to_string().contains("gzip bomb"), "{err}");
    assert!(
        seen.largest < 1 << 20,
        "allocated {} bytes at once",
        seen.largest
    );

    let path = Path::new("/data/t10k-labels-idx1-ubyte.gz");
    let err = format!("{:#}", decode_file(path, gz, labels).unwrap_err());
    assert!(
        err.contains("t10k-labels-idx1-ubyte.gz") && err.contains("more than the 10008 bytes"),
        "{err}"
    );
}

#[test]
fn the_known_file_sizes_are_those_of_the_published_files() {
    let sizes: Vec<usize> = FILES.iter().map(MnistFile::idx_len).collect();
    assert_eq!(sizes, [47_040_016, 60_008, 7_840_016, 10_008]);
}
