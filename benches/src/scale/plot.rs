//! One PNG per cost curve, drawn with plotters' bitmap backend. Text is rendered by
//! ab_glyph from DejaVu Sans Mono embedded in the binary (`benches/assets/`), so a
//! plot needs no system fonts or fontconfig.

use std::path::Path;
use std::sync::Once;

use anyhow::{Result, anyhow};
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

/// The embedded font (Bitstream Vera license, see `benches/assets/DejaVu-LICENSE`).
const FONT: &[u8] = include_bytes!("../../assets/DejaVuSansMono.ttf");
const FAMILY: &str = "sans-serif";

fn ensure_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Only fails on bytes that are not a font, which the test below rules out.
        let _ = register_font(FAMILY, FontStyle::Normal, FONT);
    });
}

/// One line: a system's points `(x, y)`.
pub struct Series<'a> {
    /// Legend text.
    pub name: &'a str,
    /// Points in increasing x.
    pub points: Vec<(f64, f64)>,
}

/// Draws the chart on `root` with `$x` as the x range (linear or log: their
/// coordinate types differ, so the drawing is spelled once for both).
macro_rules! draw {
    ($root:expr, $x:expr, $y_max:expr, $title:expr, $x_label:expr, $y_label:expr, $series:expr, $fail:expr) => {{
        let mut chart = ChartBuilder::on($root)
            .caption($title, (FAMILY, 22))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(90)
            .build_cartesian_2d($x, 0.0..$y_max)
            .map_err(|e| $fail(&e))?;
        chart
            .configure_mesh()
            .x_desc($x_label)
            .y_desc($y_label)
            .label_style((FAMILY, 14))
            .draw()
            .map_err(|e| $fail(&e))?;
        for (i, s) in $series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(|e| $fail(&e))?
                .label(s.name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(s.points.iter().map(|p| Circle::new(*p, 4, color.filled())))
                .map_err(|e| $fail(&e))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font((FAMILY, 14))
            .draw()
            .map_err(|e| $fail(&e))?;
    }};
}

/// Writes a line chart to `path` as PNG. The x axis is logarithmic when every x is
/// at least 1 and they span two orders of magnitude (the dimensions grow by powers
/// of ten), else linear (the backlog, which starts at 0).
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series<'_>],
) -> Result<()> {
    ensure_font();
    let xs = || series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let x_max = xs().fold(1.0f64, f64::max);
    let x_min = xs().fold(f64::INFINITY, f64::min);
    let y_max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0f64, f64::max);
    let y_max = if y_max > 0.0 { y_max * 1.1 } else { 1.0 };
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    let fail = |e: &dyn std::fmt::Display| anyhow!("plotting {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    if x_min >= 1.0 && x_min.is_finite() && x_max / x_min >= 100.0 {
        let range = (x_min.min(x_max)..x_max * 1.2).log_scale();
        draw!(&root, range, y_max, title, x_label, y_label, series, fail);
    } else {
        let x_min = if x_min.is_finite() {
            x_min.min(0.0)
        } else {
            0.0
        };
        draw!(
            &root,
            x_min..x_max * 1.05,
            y_max,
            title,
            x_label,
            y_label,
            series,
            fail
        );
    }
    root.present().map_err(|e| fail(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_with_text_renders_offline() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("curve.png");
        let series = [
            Series {
                name: "tidings",
                points: vec![(1.0, 700_000.0), (100.0, 690_000.0), (100_000.0, 650_000.0)],
            },
            Series {
                name: "nats",
                points: vec![(1.0, 500_000.0), (100_000.0, 300_000.0)],
            },
        ];
        line_chart(&path, "subscriptions", "subscriptions", "msgs/s", &series).expect("drawn");
        let png = std::fs::read(&path).expect("written");
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert!(png.len() > 5_000, "a real picture, {} bytes", png.len());
        // A curve from 0 (linear axis), and nothing to draw, are valid charts too.
        let from_zero = [Series {
            name: "tidings",
            points: vec![(0.0, 90_000.0), (5_000_000.0, 85_000.0)],
        }];
        line_chart(&path, "backlog", "stored", "msgs/s", &from_zero).expect("drawn");
        line_chart(&path, "empty", "x", "y", &[]).expect("drawn");
    }
}
