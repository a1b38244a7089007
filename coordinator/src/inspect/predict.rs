//! `lockstep predict`: what a saved model makes of digits, with probabilities. Test digits by
//! default (`--images N` from `--start`, or only the ones it gets wrong with `--wrong`), or a
//! person's own pictures (`--image FILE`, see [`picture`](super::picture)). Prints one line per
//! digit and draws them in a grid PNG, each labelled with its prediction and, for test digits,
//! the true digit, the wrong ones in red.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;
use lockstep_common::mnist::{IMAGE_PIXELS, IMAGE_SIDE};
use plotters::prelude::*;

use super::classify::{self, Prediction};
use super::draw::{self, drawing_error, FONT, GREY, RIGHT, WRONG};
use super::picture;
use super::source::SavedModel;

/// `lockstep predict`'s arguments.
#[derive(Args)]
pub struct PredictArgs {
    /// A run directory (its model.safetensors, or its newest checkpoint while it has not
    /// finished), a model.safetensors, or a checkpoint file.
    #[arg(value_name = "RUN_DIR|MODEL")]
    pub model: PathBuf,
    /// How many test digits to predict and draw.
    #[arg(long, value_name = "N", default_value_t = 64, conflicts_with = "image")]
    pub images: usize,
    /// The first test digit (0 to 9999).
    #[arg(
        long,
        value_name = "INDEX",
        default_value_t = 0,
        conflicts_with = "image"
    )]
    pub start: usize,
    /// Only test digits the model gets wrong (the first N from --start).
    #[arg(long, conflicts_with = "image")]
    pub wrong: bool,
    /// Your own picture of a digit instead: PNG or JPEG, any size (resized as MNIST's digits
    /// were; a light background is inverted). Repeat for several.
    #[arg(long, value_name = "FILE")]
    pub image: Vec<PathBuf>,
    /// Folder with the MNIST files (default: the run's, if it still exists, else the download
    /// cache, ~/.cache/lockstep/mnist).
    #[arg(long, env = "LOCKSTEP_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where to write the grid (default: predictions.png in the run directory, or
    /// predictions-own.png for --image; suffixed -<checkpoint> for a checkpoint).
    #[arg(long, value_name = "FILE.png")]
    pub out: Option<PathBuf>,
    /// Print one JSON object instead of the lines for people.
    #[arg(long)]
    pub json: bool,
}

/// Most digits one grid holds.
pub const MOST_IMAGES: usize = 1024;

/// One digit shown: its pixels, what it is called, its truth if known, and the prediction.
struct Shown {
    name: String,
    pixels: Vec<u8>,
    truth: Option<u8>,
    prediction: Prediction,
    notes: Vec<String>,
}

/// Runs `lockstep predict`.
pub fn run(args: &PredictArgs) -> Result<()> {
    let model = SavedModel::open(&args.model)?;
    let shown = if args.image.is_empty() {
        test_digits(args, &model)?
    } else {
        own_pictures(&args.image, &model)?
    };
    // A person's pictures get a grid of their own, beside the test digits' rather than over it.
    let name = if args.image.is_empty() {
        "predictions"
    } else {
        "predictions-own"
    };
    let grid = args
        .out
        .clone()
        .unwrap_or_else(|| model.output_path(name, "png"));
    let labelled = shown.iter().filter(|s| s.truth.is_some()).count();
    let right = shown
        .iter()
        .filter(|s| s.truth == Some(s.prediction.digit))
        .count();
    let title = if labelled > 0 {
        format!(
            "{} ({}): {right} of {labelled} right, mistakes in red",
            model.label(),
            model.model.describe()
        )
    } else {
        format!("{} ({})", model.label(), model.model.describe())
    };
    draw_grid(&grid, &shown, &title)?;
    if args.json {
        let predictions: Vec<serde_json::Value> = shown
            .iter()
            .map(|s| {
                serde_json::json!({
                    "image": s.name,
                    "predicted": s.prediction.digit,
                    "probability": s.prediction.confidence(),
                    "probabilities": s.prediction.probabilities,
                    "label": s.truth,
                    "notes": s.notes,
                })
            })
            .collect();
        let object = serde_json::json!({
            "model": model.path,
            "what": model.what,
            "network": model.model.describe(),
            "predictions": predictions,
            "correct": right,
            "labelled": labelled,
            "grid": grid,
        });
        println!("{object}");
    } else {
        let width = shown.iter().map(|s| s.name.len()).max().unwrap_or(0);
        for s in &shown {
            println!("{}", line(s, width));
        }
        if labelled > 0 {
            println!(
                "{right}/{labelled} right ({:.2}%); grid: {}",
                right as f64 * 100.0 / labelled as f64,
                grid.display()
            );
        } else {
            println!("grid: {}", grid.display());
        }
    }
    Ok(())
}

/// The test digits asked for, predicted.
fn test_digits(args: &PredictArgs, model: &SavedModel) -> Result<Vec<Shown>> {
    if args.images == 0 || args.images > MOST_IMAGES {
        bail!("--images {}: choose 1 to {MOST_IMAGES} digits", args.images);
    }
    let test = super::test_set(args.data_dir.as_deref(), model.data_dir.as_deref())?;
    if args.start >= test.len() {
        bail!(
            "--start {}: the test set has digits 0 to {}",
            args.start,
            test.len() - 1
        );
    }
    // --wrong looks through the whole rest of the set; otherwise only the digits shown.
    let end = if args.wrong {
        test.len()
    } else {
        (args.start + args.images).min(test.len())
    };
    let (_, predictions) = classify::evaluate(
        model,
        &test.images[args.start * IMAGE_PIXELS..end * IMAGE_PIXELS],
        &test.labels[args.start..end],
    )?;
    let shown: Vec<Shown> = predictions
        .into_iter()
        .enumerate()
        .map(|(i, prediction)| {
            let index = args.start + i;
            Shown {
                name: format!("test #{index}"),
                pixels: test.image(index).to_vec(),
                truth: Some(test.labels[index]),
                prediction,
                notes: Vec::new(),
            }
        })
        .filter(|s| !args.wrong || s.truth != Some(s.prediction.digit))
        .take(args.images)
        .collect();
    if shown.is_empty() {
        bail!(
            "{} gets every test digit from #{} on right: nothing to show with --wrong",
            model.path.display(),
            args.start
        );
    }
    Ok(shown)
}

/// A person's pictures, prepared as MNIST digits and predicted.
fn own_pictures(files: &[PathBuf], model: &SavedModel) -> Result<Vec<Shown>> {
    if files.len() > MOST_IMAGES {
        bail!("{} pictures: at most {MOST_IMAGES} at once", files.len());
    }
    let mut prepared = Vec::with_capacity(files.len());
    for file in files {
        let p = picture::load(file)?;
        for note in &p.notes {
            tracing::info!("{}: {note}", file.display());
        }
        prepared.push((file, p));
    }
    let pixels: Vec<u8> = prepared
        .iter()
        .flat_map(|(_, p)| p.pixels.iter().copied())
        .collect();
    let predictions = classify::classify(model, &pixels)?;
    Ok(prepared
        .into_iter()
        .zip(predictions)
        .map(|((file, p), prediction)| Shown {
            name: file.display().to_string(),
            pixels: p.pixels,
            truth: None,
            prediction,
            notes: p.notes,
        })
        .collect())
}

/// A digit's line for people:
/// `test #8    predicted 6  61.2%  true 5  WRONG  next 5 30.1%, 8 4.0%`.
fn line(s: &Shown, width: usize) -> String {
    let p = &s.prediction;
    let mut out = format!(
        "{:<width$}  predicted {}  {:>5.1}%",
        s.name,
        p.digit,
        p.confidence() * 100.0
    );
    if let Some(truth) = s.truth {
        out.push_str(&format!("  true {truth}"));
        out.push_str(if truth == p.digit {
            "       "
        } else {
            "  WRONG"
        });
    }
    let next: Vec<String> = p
        .top(3)
        .into_iter()
        .skip(1)
        .map(|(d, q)| format!("{d} {:.1}%", q * 100.0))
        .collect();
    out.push_str(&format!("  next {}", next.join(", ")));
    if s.notes.iter().any(|n| n.contains("inverted")) {
        out.push_str("  (inverted)");
    }
    out
}

/// Pixels per MNIST pixel in the grid.
const SCALE: i32 = 3;
/// A cell of the grid: the digit, then two lines of text.
pub const CELL_WIDTH: u32 = 104;
/// See [`CELL_WIDTH`].
pub const CELL_HEIGHT: u32 = 134;
/// Space above the cells for the title.
pub const HEADER: u32 = 40;
/// Space around the cells.
pub const MARGIN: u32 = 8;

/// Columns of the grid for `count` digits: 8, or 16 past 64 digits.
pub fn columns(count: usize) -> u32 {
    match count {
        0..=8 => count.max(1) as u32,
        9..=64 => 8,
        _ => 16,
    }
}

/// The grid's size for `count` digits.
pub fn grid_size(count: usize) -> (u32, u32) {
    let cols = columns(count);
    let rows = (count as u32).div_ceil(cols).max(1);
    (
        2 * MARGIN + cols * CELL_WIDTH,
        HEADER + rows * CELL_HEIGHT + MARGIN,
    )
}

/// Draws the digits as the model saw them (white on black, 3× enlarged), each with its
/// prediction and confidence, and its true digit or its file name; mistakes framed in red.
fn draw_grid(path: &Path, shown: &[Shown], title: &str) -> Result<()> {
    let cols = columns(shown.len());
    let size = grid_size(shown.len());
    draw::png(path, size, |root| {
        root.draw_text(
            title,
            &(FONT, 17).into_font().color(&BLACK),
            (MARGIN as i32 + 4, 12),
        )
        .map_err(drawing_error)?;
        let side = IMAGE_SIDE as i32 * SCALE;
        for (i, s) in shown.iter().enumerate() {
            let (col, row) = (i as u32 % cols, i as u32 / cols);
            let x = (MARGIN + col * CELL_WIDTH) as i32 + (CELL_WIDTH as i32 - side) / 2;
            let y = (HEADER + row * CELL_HEIGHT) as i32 + 6;
            let wrong = s.truth.is_some_and(|t| t != s.prediction.digit);
            let frame = if wrong {
                WRONG
            } else {
                RGBColor(0xcc, 0xcc, 0xcc)
            };
            let width = if wrong { 3 } else { 1 };
            root.draw(&Rectangle::new(
                [(x - width, y - width), (x + side + width, y + side + width)],
                frame.filled(),
            ))
            .map_err(drawing_error)?;
            for (k, &level) in s.pixels.iter().enumerate() {
                let (px, py) = ((k % IMAGE_SIDE) as i32, (k / IMAGE_SIDE) as i32);
                let at = (x + px * SCALE, y + py * SCALE);
                // A filled rectangle covers its corners' span but not the far corner's row
                // and column: (at, at + SCALE) covers SCALE × SCALE pixels.
                root.draw(&Rectangle::new(
                    [at, (at.0 + SCALE, at.1 + SCALE)],
                    RGBColor(level, level, level).filled(),
                ))
                .map_err(drawing_error)?;
            }
            let colour = if wrong { WRONG } else { BLACK };
            let first = format!(
                "{}  {:.0}%",
                s.prediction.digit,
                s.prediction.confidence() * 100.0
            );
            let text_x = x - 2;
            root.draw_text(
                &first,
                &(FONT, 18).into_font().color(&colour),
                (text_x, y + side + 6),
            )
            .map_err(drawing_error)?;
            let second = match s.truth {
                Some(t) => format!("true {t}  #{}", index_of(&s.name)),
                None => short_name(&s.name, 13),
            };
            let second_colour = if wrong {
                WRONG
            } else if s.truth.is_some() {
                RIGHT
            } else {
                GREY
            };
            root.draw_text(
                &second,
                &(FONT, 13).into_font().color(&second_colour),
                (text_x, y + side + 28),
            )
            .map_err(drawing_error)?;
        }
        Ok(())
    })
}

/// The number in a test digit's name (`test #42` → `42`).
fn index_of(name: &str) -> &str {
    name.rsplit('#').next().unwrap_or(name)
}

/// A file's name cut to `most` characters for a cell.
fn short_name(path: &str, most: usize) -> String {
    let name = Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.to_string());
    if name.chars().count() <= most {
        name
    } else {
        let kept: String = name.chars().take(most - 1).collect();
        format!("{kept}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grid_has_eight_columns_up_to_64_digits() {
        assert_eq!(columns(3), 3);
        assert_eq!(columns(16), 8);
        assert_eq!(columns(64), 8);
        assert_eq!(columns(100), 16);
        assert_eq!(
            grid_size(16),
            (
                2 * MARGIN + 8 * CELL_WIDTH,
                HEADER + 2 * CELL_HEIGHT + MARGIN
            )
        );
    }

    #[test]
    fn lines_say_prediction_truth_and_the_next_guesses() {
        let mut probabilities = [0.0; 10];
        probabilities[6] = 0.612;
        probabilities[5] = 0.301;
        probabilities[8] = 0.04;
        let s = Shown {
            name: "test #8".into(),
            pixels: vec![0; IMAGE_PIXELS],
            truth: Some(5),
            prediction: Prediction {
                digit: 6,
                probabilities,
            },
            notes: vec![],
        };
        assert_eq!(
            line(&s, 8),
            "test #8   predicted 6   61.2%  true 5  WRONG  next 5 30.1%, 8 4.0%"
        );
        assert_eq!(short_name("/tmp/a-very-long-file-name.png", 8), "a-very-…");
        assert_eq!(index_of("test #42"), "42");
    }
}
