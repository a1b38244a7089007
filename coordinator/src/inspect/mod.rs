//! Looking at what training produced, after (or while) it runs: `lockstep plot` draws learning
//! curves from runs' `metrics.jsonl`, `lockstep predict` shows what a saved model makes of test
//! digits or of a person's own pictures, `lockstep eval` measures a saved model (final or any
//! checkpoint) on the test set with its confusion matrix.
//!
//! - [`source`]: which file a run directory stands for, and loading it with its network.
//! - [`classify`]: a model's predictions, through common's network and evaluation.
//! - [`picture`]: a person's PNG or JPEG made into an MNIST digit.
//! - [`draw`]: the built-in font, colours, and writing PNG and SVG files.
//! - [`text`]: text on bitmaps, each glyph where it belongs.
//! - [`plot`], [`predict`], [`eval`]: the three commands.

use std::path::Path;

use anyhow::Result;
use lockstep_common::mnist::TestSet;

pub mod classify;
pub mod draw;
pub mod eval;
pub mod picture;
pub mod plot;
pub mod predict;
pub mod source;
pub mod text;

/// The MNIST test set for a saved model: from `--data-dir` (or `LOCKSTEP_DATA_DIR`) when
/// given, else from the folder the run was trained from when it still exists, else from the
/// download cache, as `lockstep train` finds it.
fn test_set(flag: Option<&Path>, configured: Option<&Path>) -> Result<TestSet> {
    let dir = flag.or(configured.filter(|d| d.is_dir()));
    TestSet::load_or_download(dir)
}
