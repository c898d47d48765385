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

/// Writes a line chart with a logarithmic x axis (the dimensions grow by powers of
/// ten) to `path` as PNG.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series<'_>],
) -> Result<()> {
    ensure_font();
    let all = series.iter().flat_map(|s| s.points.iter());
    let (mut x_max, mut y_max) = (1.0f64, 0.0f64);
    for (x, y) in all {
        x_max = x_max.max(*x);
        y_max = y_max.max(*y);
    }
    let y_max = if y_max > 0.0 { y_max * 1.1 } else { 1.0 };
    let x_min = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(f64::INFINITY, f64::min)
        .clamp(0.5, x_max);
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    let fail = |e: &dyn std::fmt::Display| anyhow!("plotting {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(90)
        .build_cartesian_2d((x_min..x_max * 1.2).log_scale(), 0.0..y_max)
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style((FAMILY, 14))
        .draw()
        .map_err(|e| fail(&e))?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|e| fail(&e))?
            .label(s.name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(s.points.iter().map(|p| Circle::new(*p, 4, color.filled())))
            .map_err(|e| fail(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font((FAMILY, 14))
        .draw()
        .map_err(|e| fail(&e))?;
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
        // Nothing to draw is still a valid (empty) chart.
        line_chart(&path, "empty", "x", "y", &[]).expect("drawn");
    }
}
