//! A person's own picture of a digit, made into what the network was trained on: MNIST's
//! 28×28 white digit on a black background, gray levels from 0 to 255.
//!
//! A PNG or JPEG of any size is read (turned upright by its EXIF orientation), made grayscale
//! (a transparent background counts as background), inverted when its background is light
//! (MNIST is white on black; a drawing is usually black on white), and its levels stretched so
//! the background is 0 and the brightest stroke 255. A picture that is not already 28×28 is
//! then framed as MNIST's digits were: cropped to the digit, scaled so its longer side is 20
//! pixels, and placed in the 28×28 field with its centre of mass in the middle. The model then
//! scales the pixels to [0,1] and standardises them, as in training (its own configuration's
//! `normalize`). What was done is reported, so a surprising prediction can be explained.

use std::path::Path;

use anyhow::{bail, Context, Result};
use image::imageops::FilterType;
use image::{DynamicImage, GrayImage, ImageDecoder, ImageReader, Luma};
use lockstep_common::mnist::{IMAGE_PIXELS, IMAGE_SIDE};

/// The side of the box MNIST's digits were scaled into, within the 28×28 field.
const DIGIT_BOX: u32 = 20;
/// Gray level (0–255, after stretching) above which a pixel belongs to the digit when cropping.
const INK: u8 = 64;
/// The least difference between background and brightest stroke that holds a digit.
const LEAST_CONTRAST: u8 = 24;

/// A picture prepared for the network.
#[derive(Clone, Debug, PartialEq)]
pub struct Prepared {
    /// 28 × 28 gray levels, row by row from the top, white digit on black.
    pub pixels: Vec<u8>,
    /// What was done to it, for people (`inverted: light background`, ...).
    pub notes: Vec<String>,
    /// Whether the picture was inverted.
    pub inverted: bool,
}

/// Reads the PNG or JPEG at `path` and prepares it.
pub fn load(path: &Path) -> Result<Prepared> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let image = decode(&bytes).with_context(|| {
        format!(
            "{} is not a PNG or JPEG picture that can be read",
            path.display()
        )
    })?;
    prepare(&image).with_context(|| format!("preparing {}", path.display()))
}

/// Decodes PNG or JPEG bytes, turned upright by their EXIF orientation.
fn decode(bytes: &[u8]) -> Result<DynamicImage> {
    let reader = ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format()?;
    if reader.format().is_none() {
        bail!("its content is neither PNG nor JPEG");
    }
    let mut decoder = reader.into_decoder()?;
    let orientation = decoder.orientation()?;
    let mut image = DynamicImage::from_decoder(decoder)?;
    image.apply_orientation(orientation);
    Ok(image)
}

/// Prepares a decoded picture (see the module's description).
pub fn prepare(image: &DynamicImage) -> Result<Prepared> {
    let (width, height) = (image.width(), image.height());
    if width == 0 || height == 0 {
        bail!("the picture is empty ({width}×{height})");
    }
    let mut notes = Vec::new();
    let mut gray = grayscale(image, &mut notes);
    let inverted = border_level(&gray) > 127;
    if inverted {
        image::imageops::invert(&mut gray);
        notes.push("light background: inverted to MNIST's white digit on black".into());
    }
    stretch_levels(&mut gray)?;
    let side = IMAGE_SIDE as u32;
    let gray = if (width, height) == (side, side) {
        gray
    } else {
        notes.push(format!(
            "{width}×{height}: digit cropped, scaled to fit {DIGIT_BOX}×{DIGIT_BOX} and centred by \
             its mass in 28×28, as MNIST's were"
        ));
        frame(&gray)
    };
    let pixels = gray.into_raw();
    debug_assert_eq!(pixels.len(), IMAGE_PIXELS);
    Ok(Prepared {
        pixels,
        notes,
        inverted,
    })
}

/// Gray levels of a picture; transparent parts become background (white behind dark strokes,
/// black behind light ones).
fn grayscale(image: &DynamicImage, notes: &mut Vec<String>) -> GrayImage {
    if !image.color().has_alpha() {
        return image.to_luma8();
    }
    let with_alpha = image.to_luma_alpha8();
    if with_alpha.pixels().all(|p| p.0[1] == 255) {
        return image.to_luma8();
    }
    // The strokes are the opaque pixels; lay them on the level that contrasts with them.
    let (sum, count) = with_alpha
        .pixels()
        .filter(|p| p.0[1] >= 128)
        .fold((0u64, 0u64), |(s, n), p| (s + p.0[0] as u64, n + 1));
    let behind = if count > 0 && sum / count < 128 {
        255.0
    } else {
        0.0
    };
    notes.push(format!(
        "transparent background: laid on {}",
        if behind > 0.0 { "white" } else { "black" }
    ));
    GrayImage::from_fn(image.width(), image.height(), |x, y| {
        let [level, alpha] = with_alpha.get_pixel(x, y).0;
        let a = alpha as f32 / 255.0;
        Luma([(level as f32 * a + behind * (1.0 - a)).round() as u8])
    })
}

/// The background's level: the median of the picture's outermost pixels.
fn border_level(gray: &GrayImage) -> u8 {
    let (w, h) = gray.dimensions();
    let mut border: Vec<u8> = gray
        .enumerate_pixels()
        .filter(|(x, y, _)| *x == 0 || *y == 0 || *x + 1 == w || *y + 1 == h)
        .map(|(_, _, p)| p.0[0])
        .collect();
    border.sort_unstable();
    border[border.len() / 2]
}

/// Maps the background's level to 0 and the brightest pixel to 255 (a clean MNIST digit is
/// left as it is). Refuses a picture with no stroke brighter than its background.
fn stretch_levels(gray: &mut GrayImage) -> Result<()> {
    let black = border_level(gray);
    let white = gray.pixels().map(|p| p.0[0]).max().unwrap_or(0);
    if white < black.saturating_add(LEAST_CONTRAST) {
        bail!(
            "no digit stands out from the background (levels {black} to {white} of 255): is the \
             picture blank?"
        );
    }
    if (black, white) != (0, 255) {
        let range = (white - black) as u32;
        for p in gray.pixels_mut() {
            let v = p.0[0].saturating_sub(black) as u32;
            p.0[0] = ((v * 255 + range / 2) / range).min(255) as u8;
        }
    }
    Ok(())
}

/// MNIST's framing: the digit's bounding box scaled to fit 20×20, placed in 28×28 with its
/// centre of mass at the centre.
fn frame(gray: &GrayImage) -> GrayImage {
    let (w, h) = gray.dimensions();
    let (mut x0, mut y0, mut x1, mut y1) = (w, h, 0, 0);
    for (x, y, p) in gray.enumerate_pixels() {
        if p.0[0] > INK {
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
        }
    }
    // stretch_levels guarantees a pixel at 255, so the box is never empty.
    let digit = image::imageops::crop_imm(gray, x0, y0, x1 - x0 + 1, y1 - y0 + 1).to_image();
    let (dw, dh) = digit.dimensions();
    let longer = dw.max(dh);
    let (sw, sh) = (
        (dw * DIGIT_BOX).div_ceil(longer).max(1),
        (dh * DIGIT_BOX).div_ceil(longer).max(1),
    );
    let scaled = if longer > DIGIT_BOX {
        // Area averaging: every source pixel counts once, no aliasing.
        image::imageops::thumbnail(&digit, sw, sh)
    } else {
        image::imageops::resize(&digit, sw, sh, FilterType::Triangle)
    };
    let (mass, mx, my) =
        scaled
            .enumerate_pixels()
            .fold((0.0, 0.0, 0.0), |(m, mx, my), (x, y, p)| {
                let v = p.0[0] as f64;
                (m + v, mx + v * (x as f64 + 0.5), my + v * (y as f64 + 0.5))
            });
    let side = IMAGE_SIDE as i64;
    let place = |centre: f64, size: u32| -> i64 {
        let at = (side as f64 / 2.0 - centre).round() as i64;
        at.clamp(0, side - size as i64)
    };
    let (cx, cy) = if mass > 0.0 {
        (mx / mass, my / mass)
    } else {
        (sw as f64 / 2.0, sh as f64 / 2.0)
    };
    let mut field = GrayImage::new(IMAGE_SIDE as u32, IMAGE_SIDE as u32);
    image::imageops::overlay(&mut field, &scaled, place(cx, sw), place(cy, sh));
    field
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 28×28 white-on-black "7"-like shape: a bar along row 6 and a stroke down column 18.
    fn seven() -> GrayImage {
        GrayImage::from_fn(28, 28, |x, y| {
            let on = (y == 6 && (8..=19).contains(&x)) || (x == 18 && (6..=22).contains(&y));
            Luma([if on { 255 } else { 0 }])
        })
    }

    fn ink_centre(pixels: &[u8]) -> (f64, f64) {
        let (mut m, mut mx, mut my) = (0.0, 0.0, 0.0);
        for (i, &v) in pixels.iter().enumerate() {
            let v = v as f64;
            m += v;
            mx += v * ((i % 28) as f64 + 0.5);
            my += v * ((i / 28) as f64 + 0.5);
        }
        (mx / m, my / m)
    }

    #[test]
    fn an_mnist_digit_is_used_as_it_is() {
        let p = prepare(&DynamicImage::ImageLuma8(seven())).unwrap();
        assert_eq!(p.pixels, seven().into_raw());
        assert!(!p.inverted);
        assert!(p.notes.is_empty(), "{:?}", p.notes);
    }

    #[test]
    fn a_dark_digit_on_a_light_background_is_inverted() {
        let mut drawn = seven();
        image::imageops::invert(&mut drawn);
        let p = prepare(&DynamicImage::ImageLuma8(drawn)).unwrap();
        assert!(p.inverted);
        assert!(p.notes[0].contains("inverted"), "{:?}", p.notes);
        assert_eq!(p.pixels, seven().into_raw());
    }

    #[test]
    fn a_photo_with_gray_paper_and_pencil_is_stretched_to_black_and_white() {
        let photo = GrayImage::from_fn(28, 28, |x, y| {
            Luma([if seven().get_pixel(x, y).0[0] > 0 {
                90
            } else {
                200
            }])
        });
        let p = prepare(&DynamicImage::ImageLuma8(photo)).unwrap();
        assert_eq!(p.pixels, seven().into_raw());
    }

    #[test]
    fn a_large_picture_is_framed_as_mnist_and_keeps_its_orientation() {
        // Black on white, 10 times larger, off centre in a wide canvas (an "L": a stroke
        // down the left and a bar along the bottom).
        let big = GrayImage::from_fn(500, 300, |x, y| {
            let down = (40..60).contains(&x) && (30..230).contains(&y);
            let bar = (40..160).contains(&x) && (210..230).contains(&y);
            Luma([if down || bar { 0 } else { 255 }])
        });
        let p = prepare(&DynamicImage::ImageLuma8(big)).unwrap();
        assert_eq!(p.pixels.len(), IMAGE_PIXELS);
        assert!(p.inverted);
        assert!(
            p.notes.iter().any(|n| n.contains("500×300")),
            "{:?}",
            p.notes
        );
        let lit: Vec<(usize, usize)> = (0..IMAGE_PIXELS)
            .filter(|&i| p.pixels[i] > INK)
            .map(|i| (i % 28, i / 28))
            .collect();
        let (xs, ys): (Vec<usize>, Vec<usize>) = lit.iter().copied().unzip();
        let height = ys.iter().max().unwrap() - ys.iter().min().unwrap() + 1;
        let width = xs.iter().max().unwrap() - xs.iter().min().unwrap() + 1;
        assert!((19..=20).contains(&height), "{height}");
        assert!(width < height, "an L taller than wide: {width}×{height}");
        let (cx, cy) = ink_centre(&p.pixels);
        assert!(
            (cx - 14.0).abs() <= 1.0 && (cy - 14.0).abs() <= 1.0,
            "{cx} {cy}"
        );
        // Not transposed nor mirrored: the long stroke is on the left, the bar at the bottom.
        let column = |x: usize| (0..28).filter(|&y| p.pixels[y * 28 + x] > INK).count();
        let row = |y: usize| (0..28).filter(|&x| p.pixels[y * 28 + x] > INK).count();
        let left = *xs.iter().min().unwrap();
        let bottom = *ys.iter().max().unwrap();
        assert!(column(left) >= 15, "the stroke runs down the left");
        assert!(row(bottom) >= 8, "the bar runs along the bottom");
        assert!(
            row(*ys.iter().min().unwrap()) <= 3,
            "the top is the stroke's end"
        );
    }

    #[test]
    fn a_small_picture_is_enlarged_to_the_box() {
        let small = GrayImage::from_fn(10, 10, |x, _| {
            Luma([if x == 4 || x == 5 { 255 } else { 0 }])
        });
        let p = prepare(&DynamicImage::ImageLuma8(small)).unwrap();
        let rows = (0..28)
            .filter(|&y| (0..28).any(|x| p.pixels[y * 28 + x] > INK))
            .count();
        assert_eq!(rows, DIGIT_BOX as usize);
    }

    #[test]
    fn transparent_strokes_are_laid_on_a_contrasting_background() {
        // Black strokes on a transparent background (what drawing programs export).
        let drawn = image::GrayAlphaImage::from_fn(28, 28, |x, y| {
            let on = seven().get_pixel(x, y).0[0] > 0;
            image::LumaA([0, if on { 255 } else { 0 }])
        });
        let p = prepare(&DynamicImage::ImageLumaA8(drawn)).unwrap();
        assert!(p.inverted);
        assert_eq!(p.pixels, seven().into_raw());
    }

    #[test]
    fn a_blank_picture_is_refused() {
        let blank = GrayImage::from_pixel(50, 50, Luma([250]));
        let err = prepare(&DynamicImage::ImageLuma8(blank))
            .unwrap_err()
            .to_string();
        assert!(err.contains("blank"), "{err}");
    }

    #[test]
    fn png_and_jpeg_decode_and_other_bytes_do_not() {
        let mut png = Vec::new();
        DynamicImage::ImageLuma8(seven())
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        assert_eq!(decode(&png).unwrap().to_luma8(), seven());
        let mut jpeg = Vec::new();
        DynamicImage::ImageLuma8(seven())
            .write_to(
                &mut std::io::Cursor::new(&mut jpeg),
                image::ImageFormat::Jpeg,
            )
            .unwrap();
        let back = decode(&jpeg).unwrap();
        assert_eq!((back.width(), back.height()), (28, 28));
        let err = decode(b"epoch,loss\n1,0.5\n").unwrap_err().to_string();
        assert!(err.contains("neither PNG nor JPEG"), "{err}");
    }
}
