//! `--svg FILE`: median seconds against oversubscription, one panel per workload, one line per
//! policy (and advice), drawn with plotters' SVG backend.

use std::path::Path;

use plotters::prelude::*;

/// One panel: a title and named series of (oversub, seconds) points.
#[derive(Debug)]
pub struct Panel {
    pub title: String,
    pub series: Vec<(String, Vec<(f64, f64)>)>,
}

const COLORS: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x17, 0xbe, 0xcf),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
];

/// Writes the panels into one SVG file, two panels per row.
pub fn write(path: &Path, panels: &[Panel]) -> Result<(), String> {
    draw(path, panels).map_err(|e| e.to_string())
}

fn draw(path: &Path, panels: &[Panel]) -> Result<(), Box<dyn std::error::Error>> {
    let cols = panels.len().clamp(1, 2);
    let rows = panels.len().div_ceil(cols).max(1);
    let root = SVGBackend::new(path, (cols as u32 * 520, rows as u32 * 340)).into_drawing_area();
    root.fill(&WHITE)?;
    if panels.is_empty() {
        root.draw(&Text::new("no runs to draw", (20, 20), ("sans-serif", 16)))?;
        root.present()?;
        return Ok(());
    }
    // One colour per series name across every panel (a policy keeps its colour).
    let mut names: Vec<&str> = Vec::new();
    for (name, _) in panels.iter().flat_map(|p| p.series.iter()) {
        if !names.contains(&name.as_str()) {
            names.push(name);
        }
    }
    let areas = root.split_evenly((rows, cols));
    for (area, panel) in areas.iter().zip(panels) {
        let pts = panel.series.iter().flat_map(|(_, p)| p.iter()).filter(|(x, y)| x.is_finite() && y.is_finite());
        let (mut x0, mut x1, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, 0f64);
        for &(x, y) in pts {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y1 = y1.max(y);
        }
        if !x0.is_finite() {
            (x0, x1) = (0.0, 1.0);
        }
        let pad = ((x1 - x0) * 0.05).max(0.05);
        let y1 = if y1 > 0.0 { y1 * 1.1 } else { 1.0 };
        let decimals = match y1 {
            y if y < 0.01 => 4,
            y if y < 0.1 => 3,
            y if y < 10.0 => 2,
            _ => 1,
        };
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d((x0 - pad)..(x1 + pad), 0f64..y1)?;
        chart
            .configure_mesh()
            .x_desc("oversubscription (working set / device memory)")
            .y_desc("seconds (median)")
            .x_label_formatter(&|x| format!("{x:.2}"))
            .y_label_formatter(&|y| format!("{y:.decimals$}"))
            .draw()?;
        for (name, pts) in &panel.series {
            let i = names.iter().position(|n| n == name).unwrap_or(0);
            let color = COLORS[i % COLORS.len()];
            let pts: Vec<(f64, f64)> = pts.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
            chart.draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
