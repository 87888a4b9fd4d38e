//! Small PNG plots for training runs (loss, learning rate, accuracy curves, confusion matrices),
//! drawn directly with the `image` crate and an 8×8 bitmap font, so no font files are needed.

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::error::{Error, Result};

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const BLACK: Rgb<u8> = Rgb([20, 20, 20]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);
const PALETTE: [Rgb<u8>; 4] = [
    Rgb([31, 119, 180]),
    Rgb([214, 39, 40]),
    Rgb([44, 160, 44]),
    Rgb([148, 103, 189]),
];

/// Draws ASCII `text` at `(x, y)` with the 8×8 font magnified `scale` times.
fn draw_text(img: &mut RgbImage, text: &str, x: i64, y: i64, scale: i64, colour: Rgb<u8>) {
    for (i, ch) in text.chars().enumerate() {
        let glyph = font8x8::legacy::BASIC_LEGACY[(ch as usize) & 0x7f];
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits >> col & 1 == 1 {
                    for dy in 0..scale {
                        for dx in 0..scale {
                            put(
                                img,
                                x + (i as i64 * 8 + col) * scale + dx,
                                y + row as i64 * scale + dy,
                                colour,
                            );
                        }
                    }
                }
            }
        }
    }
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn line(img: &mut RgbImage, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: Rgb<u8>) {
    let steps = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as i64).max(1);
    for s in 0..=steps {
        let t = s as f64 / steps as f64;
        let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
        put(img, x.round() as i64, y.round() as i64, c);
        put(img, x.round() as i64, y.round() as i64 + 1, c);
    }
}

fn format_tick(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 {
        "0".into()
    } else if !(0.01..1e5).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn save(img: &RgbImage, path: &Path) -> Result<()> {
    img.save(path)
        .map_err(|e| Error::Input(format!("cannot write plot {}: {e}", path.display())))
}

/// A line plot of one or more `(label, points)` series against a shared x axis.
pub fn line_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    series: &[(&str, Vec<(f64, f64)>)],
) -> Result<()> {
    let (w, h) = (720u32, 420u32);
    let (left, right, top, bottom) = (80.0, 20.0, 50.0, 50.0);
    let mut img = RgbImage::from_pixel(w, h, WHITE);
    draw_text(&mut img, title, left as i64, 14, 2, BLACK);
    let points: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|(_, p)| p.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    if points.is_empty() {
        draw_text(
            &mut img,
            "no data",
            w as i64 / 2 - 28,
            h as i64 / 2,
            1,
            BLACK,
        );
        return save(&img, path);
    }
    let (mut x0, mut x1) = points
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut y0, mut y1) = points
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        y0 -= 0.5;
        y1 += 0.5;
    }
    let pad = (y1 - y0) * 0.05;
    (y0, y1) = (y0 - pad, y1 + pad);
    x0 = x0.min(x1);
    let (pw, ph) = (w as f64 - left - right, h as f64 - top - bottom);
    let to_px = |(x, y): (f64, f64)| {
        (
            left + (x - x0) / (x1 - x0) * pw,
            top + (1.0 - (y - y0) / (y1 - y0)) * ph,
        )
    };
    for i in 0..=4 {
        let fy = y0 + (y1 - y0) * i as f64 / 4.0;
        let (_, py) = to_px((x0, fy));
        line(&mut img, (left, py), (left + pw, py), GRID);
        draw_text(&mut img, &format_tick(fy), 4, py as i64 - 4, 1, BLACK);
        let fx = x0 + (x1 - x0) * i as f64 / 4.0;
        let (px, _) = to_px((fx, y0));
        draw_text(
            &mut img,
            &format_tick(fx),
            px as i64 - 12,
            (top + ph) as i64 + 8,
            1,
            BLACK,
        );
    }
    line(&mut img, (left, top), (left, top + ph), BLACK);
    line(&mut img, (left, top + ph), (left + pw, top + ph), BLACK);
    draw_text(
        &mut img,
        x_label,
        (left + pw / 2.0) as i64 - 16,
        h as i64 - 18,
        1,
        BLACK,
    );
    for (k, (label, pts)) in series.iter().enumerate() {
        let colour = PALETTE[k % PALETTE.len()];
        for pair in pts.windows(2) {
            line(&mut img, to_px(pair[0]), to_px(pair[1]), colour);
        }
        if let [only] = pts.as_slice() {
            let (px, py) = to_px(*only);
            line(&mut img, (px - 3.0, py), (px + 3.0, py), colour);
        }
        draw_text(
            &mut img,
            label,
            (left + pw) as i64 - 8 * 20,
            top as i64 + 6 + 12 * k as i64,
            1,
            colour,
        );
    }
    save(&img, path)
}

/// A confusion matrix as a heat map: rows are true classes, columns predictions, each row
/// normalised; class names label the rows.
pub fn confusion_png(
    path: &Path,
    title: &str,
    labels: &[String],
    matrix: &[Vec<u64>],
) -> Result<()> {
    let n = labels.len().max(1);
    let cell = (360 / n).clamp(8, 40) as u32;
    let label_w = 8 * labels.iter().map(|l| l.len()).max().unwrap_or(4).min(24) as u32 + 16;
    let title_w = 16 * title.len() as u32 + 24;
    let (w, h) = (
        (label_w + cell * n as u32 + 20).max(title_w),
        60 + cell * n as u32 + 30,
    );
    let mut img = RgbImage::from_pixel(w, h, WHITE);
    draw_text(&mut img, title, 8, 14, 2, BLACK);
    draw_text(
        &mut img,
        "rows: true class, columns: predicted",
        8,
        38,
        1,
        BLACK,
    );
    for (r, row) in matrix.iter().enumerate() {
        let total: u64 = row.iter().sum::<u64>().max(1);
        for (c, &v) in row.iter().enumerate() {
            let shade = 255 - (255.0 * v as f64 / total as f64) as u8;
            let colour = Rgb([shade, shade, 255]);
            for dy in 0..cell - 1 {
                for dx in 0..cell - 1 {
                    put(
                        &mut img,
                        (label_w + c as u32 * cell + dx) as i64,
                        (60 + r as u32 * cell + dy) as i64,
                        colour,
                    );
                }
            }
        }
        let name: String = labels
            .get(r)
            .map(|l| l.chars().take(24).collect())
            .unwrap_or_default();
        draw_text(
            &mut img,
            &name,
            8,
            (60 + r as u32 * cell + cell / 2) as i64 - 4,
            1,
            BLACK,
        );
    }
    save(&img, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_are_written_as_png() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("loss.png");
        line_plot(
            &p,
            "loss",
            "step",
            &[("train", vec![(0.0, 2.0), (1.0, 1.0), (2.0, 0.5)])],
        )
        .unwrap();
        let img = image::open(&p).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (720, 420));
        assert!(img.pixels().any(|px| *px == PALETTE[0]));
        let c = dir.path().join("cm.png");
        confusion_png(
            &c,
            "confusion",
            &["a".into(), "b".into()],
            &[vec![3, 1], vec![0, 4]],
        )
        .unwrap();
        assert!(image::open(&c).is_ok());
    }
}
