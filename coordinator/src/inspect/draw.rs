//! What the pictures share: the font compiled into the binary (DejaVu Sans, cut down to Latin-1;
//! see `coordinator/assets/`), so text renders with no system fonts or fontconfig; the colours
//! of runs; drawing into an RGB buffer ([`Bitmap`]) and writing it as a PNG, or an SVG file.

use std::path::Path;
use std::sync::OnceLock;

use ab_glyph::FontRef;
use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;

use super::text::Bitmap;

/// The font family every text in the pictures asks for.
pub const FONT: &str = "sans-serif";

static FONT_BYTES: &[u8] = include_bytes!("../../assets/DejaVuSans-Latin1.ttf");

/// The built-in font, registered with plotters (once; every drawing calls this first) for
/// measuring text and for SVG pictures.
pub fn load_font() -> Result<FontRef<'static>> {
    static LOADED: OnceLock<Option<FontRef<'static>>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).ok()?;
            FontRef::try_from_slice(FONT_BYTES).ok()
        })
        .clone()
        .ok_or_else(|| anyhow!("the font built into lockstep does not load"))
}

/// Colours told apart easily, for runs drawn together (matplotlib's `tab10`).
pub const RUN_COLOURS: [RGBColor; 10] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x17, 0xbe, 0xcf),
];

/// What marks a wrong prediction.
pub const WRONG: RGBColor = RGBColor(0xd6, 0x27, 0x28);
/// What marks a right one.
pub const RIGHT: RGBColor = RGBColor(0x1a, 0x7f, 0x37);
/// Secondary text.
pub const GREY: RGBColor = RGBColor(0x55, 0x55, 0x55);

/// An error of plotters' drawing, as the project's error type.
pub fn drawing_error<E: std::error::Error + Send + Sync + 'static>(
    e: DrawingAreaErrorKind<E>,
) -> anyhow::Error {
    anyhow!("drawing: {e}")
}

/// A white RGB canvas of `width × height` pixels, drawn on by `draw` and written to `path` as
/// a PNG.
pub fn png(
    path: &Path,
    (width, height): (u32, u32),
    draw: impl FnOnce(DrawingArea<Bitmap, plotters::coord::Shift>) -> Result<()>,
) -> Result<()> {
    let font = load_font()?;
    let mut buffer = vec![255u8; width as usize * height as usize * 3];
    {
        let root = Bitmap::new(&mut buffer, (width, height), font).into_drawing_area();
        draw(root.clone())?;
        root.present().map_err(drawing_error)?;
    }
    write_png(path, buffer, (width, height))
}

/// Writes RGB pixels (row by row from the top) as a PNG file, compressed hard (pictures of a
/// few hundred kilobytes that people keep and commit).
pub fn write_png(path: &Path, rgb: Vec<u8>, (width, height): (u32, u32)) -> Result<()> {
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    use image::ImageEncoder;
    let mut bytes = Vec::new();
    PngEncoder::new_with_quality(&mut bytes, CompressionType::Best, FilterType::Adaptive)
        .write_image(&rgb, width, height, image::ExtendedColorType::Rgb8)
        .with_context(|| format!("encoding {}", path.display()))?;
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// An SVG picture of `width × height`, drawn by `draw` and written to `path`.
pub fn svg(
    path: &Path,
    (width, height): (u32, u32),
    draw: impl FnOnce(DrawingArea<SVGBackend, plotters::coord::Shift>) -> Result<()>,
) -> Result<()> {
    load_font()?;
    let mut text = String::new();
    {
        let root = SVGBackend::with_string(&mut text, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(drawing_error)?;
        draw(root.clone())?;
        root.present().map_err(drawing_error)?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_renders_with_the_built_in_font() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("text.png");
        png(&path, (120, 40), |root| {
            root.draw_text("epoch 7 ✓", &(FONT, 20).into_font().color(&BLACK), (5, 5))
                .map_err(drawing_error)
        })
        .unwrap();
        let image = image::open(&path).unwrap().to_rgb8();
        assert_eq!(image.dimensions(), (120, 40));
        let dark = image.pixels().filter(|p| p.0[0] < 100).count();
        assert!(dark > 50, "the text left {dark} dark pixels");
    }
}
