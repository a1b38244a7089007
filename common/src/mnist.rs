//! MNIST: the IDX file format (raw or gzip), verification against the published checksums,
//! download into a cache folder, and the input transform every replica applies.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use md5::Md5;
use sha2::{Digest, Sha256};
use thiserror::Error;

/// Side of an MNIST image.
pub const IMAGE_SIDE: usize = 28;
/// Pixels per image.
pub const IMAGE_PIXELS: usize = IMAGE_SIDE * IMAGE_SIDE;
/// Mean pixel value of the training set after scaling to [0,1].
pub const MEAN: f32 = 0.1307;
/// Standard deviation of the training set pixels after scaling to [0,1].
pub const STD: f32 = 0.3081;

/// One of the four MNIST files, with what a good copy looks like.
pub struct MnistFile {
    /// File name without `.gz`.
    pub name: &'static str,
    /// IDX dimensions a good copy has.
    pub dims: &'static [usize],
    /// MD5 of the gzip file as published with the original download.
    pub published_gz_md5: &'static str,
    /// SHA-256 of the decompressed IDX bytes.
    pub idx_sha256: &'static str,
}

impl MnistFile {
    /// Bytes of a good copy once decompressed: the IDX header and the data its dimensions
    /// imply. No stream is inflated past this.
    pub fn idx_len(&self) -> usize {
        4 + 4 * self.dims.len() + self.dims.iter().product::<usize>()
    }
}

/// The four files in the order train images, train labels, test images, test labels.
pub const FILES: [MnistFile; 4] = [
    MnistFile {
        name: "train-images-idx3-ubyte",
        dims: &[60_000, 28, 28],
        published_gz_md5: "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        idx_sha256: "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    },
    MnistFile {
        name: "train-labels-idx1-ubyte",
        dims: &[60_000],
        published_gz_md5: "d53e105ee54ea40749a09fcbcd1e9432",
        idx_sha256: "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    },
    MnistFile {
        name: "t10k-images-idx3-ubyte",
        dims: &[10_000, 28, 28],
        published_gz_md5: "9fb629c4189551a2d022fa330f9573f3",
        idx_sha256: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    },
    MnistFile {
        name: "t10k-labels-idx1-ubyte",
        dims: &[10_000],
        published_gz_md5: "ec29112dd5afa0611ce80d1b7f02629c",
        idx_sha256: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
];

/// Maintained mirrors of the original files (the original site no longer serves them).
pub const MIRRORS: [&str; 2] = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
];

/// Why an IDX file could not be read.
#[derive(Debug, Error)]
pub enum IdxError {
    /// The file is shorter than its header.
    #[error("file is {0} bytes, shorter than an IDX header")]
    NoHeader(usize),
    /// The magic number is not an IDX magic for unsigned bytes.
    #[error("not an unsigned-byte IDX file (magic bytes {0:02x?}, expected 00 00 08 NN)")]
    BadMagic([u8; 4]),
    /// Header and payload disagree in size.
    #[error(
        "header promises {expected} data bytes but the file has {got} (file truncated or corrupt)"
    )]
    WrongSize {
        /// Bytes the header dimensions imply.
        expected: usize,
        /// Bytes present.
        got: usize,
    },
    /// The gzip stream is damaged.
    #[error("gzip stream is corrupt or truncated: {0}")]
    Gzip(std::io::Error),
    /// The gzip stream inflates to more than the file can hold.
    #[error(
        "gzip stream inflates to more than the {0} bytes this file holds (a corrupt file, or a gzip bomb); \
         inflating was stopped there"
    )]
    TooLarge(usize),
}

/// A parsed IDX array of unsigned bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    /// Dimensions, outermost first.
    pub dims: Vec<usize>,
    /// Row-major values.
    pub data: Vec<u8>,
}

/// Decompresses `bytes` if they are gzip (by magic number), else returns them as they are. A
/// stream that inflates to more than `limit` bytes is refused as soon as it passes the limit,
/// so a small file cannot make the reader allocate without bound (a gzip bomb).
pub fn maybe_gunzip(bytes: Vec<u8>, limit: usize) -> Result<Vec<u8>, IdxError> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let room = limit.saturating_add(1);
        let mut out = Vec::with_capacity(bytes.len().saturating_mul(5).min(room));
        flate2::read::GzDecoder::new(&bytes[..])
            .take(room as u64)
            .read_to_end(&mut out)
            .map_err(IdxError::Gzip)?;
        if out.len() > limit {
            return Err(IdxError::TooLarge(limit));
        }
        Ok(out)
    } else {
        Ok(bytes)
    }
}

/// Parses decompressed IDX bytes.
pub fn parse_idx(bytes: &[u8]) -> Result<IdxArray, IdxError> {
    if bytes.len() < 4 {
        return Err(IdxError::NoHeader(bytes.len()));
    }
    let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
    if magic[0] != 0 || magic[1] != 0 || magic[2] != 0x08 || magic[3] == 0 || magic[3] > 4 {
        return Err(IdxError::BadMagic(magic));
    }
    let ndims = magic[3] as usize;
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(IdxError::NoHeader(bytes.len()));
    }
    let dims: Vec<usize> = (0..ndims)
        .map(|i| {
            let b = &bytes[4 + 4 * i..8 + 4 * i];
            u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
        })
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .unwrap_or(usize::MAX);
    let got = bytes.len() - header;
    if expected != got {
        return Err(IdxError::WrongSize { expected, got });
    }
    Ok(IdxArray {
        dims,
        data: bytes[header..].to_vec(),
    })
}

/// The MNIST training and test sets, pixels as `u8` (what travels on the wire).
pub struct Mnist {
    /// 60,000 × 784 pixels.
    pub train_images: Vec<u8>,
    /// 60,000 labels in 0..10.
    pub train_labels: Vec<u8>,
    /// 10,000 × 784 pixels.
    pub test_images: Vec<u8>,
    /// 10,000 labels in 0..10.
    pub test_labels: Vec<u8>,
}

impl Mnist {
    /// Number of training samples.
    pub fn train_len(&self) -> usize {
        self.train_labels.len()
    }

    /// Number of test samples.
    pub fn test_len(&self) -> usize {
        self.test_labels.len()
    }

    /// Loads the four files from `dir` (each either `NAME` or `NAME.gz`), verifying their
    /// structure and their content against the published MNIST.
    pub fn load(dir: &Path) -> Result<Self> {
        let mut arrays = Vec::with_capacity(4);
        for f in &FILES {
            arrays.push(load_file(dir, f)?);
        }
        let mut it = arrays.into_iter();
        let (a, b, c, d) = (it.next(), it.next(), it.next(), it.next());
        let (Some(a), Some(b), Some(c), Some(d)) = (a, b, c, d) else {
            unreachable!("four files were loaded")
        };
        Ok(Mnist {
            train_images: a,
            train_labels: b,
            test_images: c,
            test_labels: d,
        })
    }

    /// Loads from `data_dir` if given, else from the download cache, downloading what is
    /// missing.
    pub fn load_or_download(data_dir: Option<&Path>) -> Result<Self> {
        match data_dir {
            Some(dir) => Self::load(dir),
            None => {
                let cache = cache_dir();
                download(&cache)?;
                Self::load(&cache)
            }
        }
    }
}

/// The 10,000 test images and their labels, without the training set.
pub struct TestSet {
    /// 10,000 × 784 pixels.
    pub images: Vec<u8>,
    /// 10,000 labels in 0..10.
    pub labels: Vec<u8>,
}

impl TestSet {
    /// Loads the two test files from `data_dir` if given, else from the download cache
    /// (downloading what is missing), verified as [`Mnist::load`] verifies them: what
    /// evaluating a saved model needs, in a fraction of the time the training set takes.
    pub fn load_or_download(data_dir: Option<&Path>) -> Result<Self> {
        let dir = match data_dir {
            Some(dir) => dir.to_path_buf(),
            None => {
                let cache = cache_dir();
                download(&cache)?;
                cache
            }
        };
        Ok(TestSet {
            images: load_file(&dir, &FILES[2])?,
            labels: load_file(&dir, &FILES[3])?,
        })
    }

    /// Number of test samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the set is empty (never, once loaded).
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The pixels of image `index`, row by row (row 0 at the top).
    pub fn image(&self, index: usize) -> &[u8] {
        &self.images[index * IMAGE_PIXELS..(index + 1) * IMAGE_PIXELS]
    }
}

fn load_file(dir: &Path, f: &MnistFile) -> Result<Vec<u8>> {
    let gz = dir.join(format!("{}.gz", f.name));
    let raw = dir.join(f.name);
    let path = if gz.exists() {
        gz
    } else if raw.exists() {
        raw
    } else {
        bail!(
            "MNIST file {} (or {}.gz) not found in {}. Point --data-dir (or LOCKSTEP_DATA_DIR) at a \
             folder holding the four MNIST files, or leave it unset to download them into {}",
            f.name,
            f.name,
            dir.display(),
            cache_dir().display()
        );
    };
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    decode_file(&path, bytes, f)
}

/// Checks the bytes read from `path` (raw or gzip) against what a good copy of `f` looks like,
/// and returns its data.
fn decode_file(path: &Path, bytes: Vec<u8>, f: &MnistFile) -> Result<Vec<u8>> {
    let what = || format!("reading {}", path.display());
    let idx_bytes = maybe_gunzip(bytes, f.idx_len())
        .with_context(what)
        .with_context(|| {
            "delete the file to re-download it, or replace it with a good copy".to_string()
        })?;
    let arr = parse_idx(&idx_bytes).with_context(|| {
        format!(
            "{}: delete it to re-download, or replace it with a good copy",
            what()
        )
    })?;
    if arr.dims != f.dims {
        bail!(
            "{}: dimensions {:?}, expected {:?} for {}; is this the right file?",
            what(),
            arr.dims,
            f.dims,
            f.name
        );
    }
    let sha = hex::encode(Sha256::digest(&idx_bytes));
    if sha != f.idx_sha256 {
        bail!(
            "{}: contents differ from the published MNIST (SHA-256 of the decompressed file is {sha}, \
             expected {}); the file is corrupt: delete it to re-download, or replace it",
            what(),
            f.idx_sha256
        );
    }
    if f.dims.len() == 1 && arr.data.iter().any(|&l| l > 9) {
        bail!("{}: a label is outside 0..=9", what());
    }
    Ok(arr.data)
}

/// The download cache: `$LOCKSTEP_CACHE_DIR`, else `$XDG_CACHE_HOME/lockstep/mnist`, else
/// `~/.cache/lockstep/mnist`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LOCKSTEP_CACHE_DIR") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("lockstep").join("mnist")
}

/// Downloads the missing MNIST files into `dir`, checking each against its published MD5.
pub fn download(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the MNIST cache {}", dir.display()))?;
    for f in &FILES {
        let target = dir.join(format!("{}.gz", f.name));
        if target.exists() || dir.join(f.name).exists() {
            continue;
        }
        let mut last_error = None;
        for mirror in MIRRORS {
            let url = format!("{mirror}{}.gz", f.name);
            tracing::info!("downloading {url}");
            match fetch(&url) {
                Ok(bytes) => {
                    let md5 = hex::encode(Md5::digest(&bytes));
                    if md5 != f.published_gz_md5 {
                        last_error = Some(format!(
                            "{url}: MD5 {md5} does not match the published {}",
                            f.published_gz_md5
                        ));
                        continue;
                    }
                    let tmp = dir.join(format!("{}.gz.part", f.name));
                    std::fs::write(&tmp, &bytes)
                        .and_then(|_| std::fs::rename(&tmp, &target))
                        .with_context(|| format!("writing {}", target.display()))?;
                    last_error = None;
                    break;
                }
                Err(e) => last_error = Some(format!("{url}: {e}")),
            }
        }
        if let Some(e) = last_error {
            bail!(
                "could not download MNIST ({e}). If this machine is offline, copy the four files \
                 (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, \
                 t10k-labels-idx1-ubyte.gz) into a folder and pass --data-dir FOLDER (or set \
                 LOCKSTEP_DATA_DIR), or place them in {}",
                dir.display()
            );
        }
    }
    Ok(())
}

fn fetch(url: &str) -> Result<Vec<u8>> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(std::time::Duration::from_secs(120)))
        .timeout_connect(Some(std::time::Duration::from_secs(10)))
        .build()
        .into();
    let mut response = agent.get(url).call()?;
    let bytes = response
        .body_mut()
        .with_config()
        .limit(64 * 1024 * 1024)
        .read_to_vec()?;
    Ok(bytes)
}

/// Converts `u8` pixels to the model's input: scaled to [0,1] and, if `normalize`, standardised.
pub fn pixels_to_f32(pixels: &[u8], normalize: bool, out: &mut Vec<f32>) {
    out.clear();
    out.reserve(pixels.len());
    if normalize {
        let scale = 1.0 / (255.0 * STD);
        let shift = MEAN / STD;
        out.extend(pixels.iter().map(|&p| p as f32 * scale - shift));
    } else {
        out.extend(pixels.iter().map(|&p| p as f32 / 255.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    pub(super) fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(data);
        v
    }

    pub(super) fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn parses_raw_and_gzip_idx() {
        let raw = idx(&[2, 3], &[1, 2, 3, 4, 5, 6]);
        let a = parse_idx(&raw).unwrap();
        assert_eq!(a.dims, vec![2, 3]);
        assert_eq!(a.data, vec![1, 2, 3, 4, 5, 6]);
        let b = parse_idx(&maybe_gunzip(gzip(&raw), raw.len()).unwrap()).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn truncated_and_corrupt_files_are_refused() {
        let raw = idx(&[2, 3], &[1, 2, 3, 4, 5, 6]);
        assert!(matches!(
            parse_idx(&raw[..raw.len() - 1]),
            Err(IdxError::WrongSize {
                expected: 6,
                got: 5
            })
        ));
        assert!(matches!(parse_idx(&raw[..6]), Err(IdxError::NoHeader(6))));
        let mut bad = raw.clone();
        bad[2] = 0x0d; // float IDX, not u8
        assert!(matches!(parse_idx(&bad), Err(IdxError::BadMagic(_))));
        let gz = gzip(&raw);
        assert!(matches!(
            maybe_gunzip(gz[..gz.len() / 2].to_vec(), raw.len()),
            Err(IdxError::Gzip(_))
        ));
        let mut flipped = gz.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0xff;
        assert!(maybe_gunzip(flipped, raw.len())
            .and_then(|b| parse_idx(&b))
            .is_err());
    }

    #[test]
    fn missing_and_corrupt_dataset_errors_say_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let err = format!("{:#}", Mnist::load(dir.path()).err().unwrap());
        assert!(
            err.contains("not found") && err.contains("--data-dir"),
            "{err}"
        );

        std::fs::write(
            dir.path().join("train-images-idx3-ubyte"),
            idx(&[1, 28, 28], &[0; 784]),
        )
        .unwrap();
        let err = format!("{:#}", Mnist::load(dir.path()).err().unwrap());
        assert!(err.contains("dimensions [1, 28, 28]"), "{err}");
    }

    #[test]
    fn normalisation_matches_the_published_constants() {
        let mut out = Vec::new();
        pixels_to_f32(&[0, 255], true, &mut out);
        assert!((out[0] - (-0.1307 / 0.3081)).abs() < 1e-6);
        assert!((out[1] - ((1.0 - 0.1307) / 0.3081)).abs() < 1e-5);
        pixels_to_f32(&[0, 255], false, &mut out);
        assert_eq!(out, vec![0.0, 1.0]);
    }
}

#[cfg(test)]
mod props;
