//! The wedge scattergram: each sample's offset against its round trip.
//!
//! A sample with round trip `rtt` can be off the truth by at most `rtt/2`,
//! so the samples fill a wedge whose apex is the true offset; the quiet
//! samples sit near the apex, queueing pushes samples out along the edges.
//! Each run's estimate is drawn at twice its stated bound: inside the wedge
//! means the bound was honest, and low means it was tight.

use crate::accuracy::Run;
use plotters::prelude::*;
use std::path::Path;

/// Draws the scattergram of `runs` to an SVG file.
pub fn wedge(path: &Path, title: &str, runs: &[Run]) -> Result<(), Box<dyn std::error::Error>> {
    let us = |ns: i64| ns as f64 / 1e3;
    let samples: Vec<(f64, f64)> = runs
        .iter()
        .flat_map(|r| r.probes.iter().map(|&(rtt, err)| (us(rtt), us(err))))
        .collect();
    let estimates: Vec<(f64, f64)> = runs
        .iter()
        .filter(|r| r.synced)
        .map(|r| (us(2 * r.bound_ns), us(r.error_ns)))
        .collect();
    let x_max = samples
        .iter()
        .chain(&estimates)
        .map(|p| p.0)
        .fold(1.0, f64::max)
        * 1.05;
    let y_max = samples
        .iter()
        .chain(&estimates)
        .map(|p| p.1.abs())
        .fold(x_max / 2.0, f64::max)
        * 1.05;

    let root = SVGBackend::new(path, (760, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, -y_max..y_max)?;
    chart
        .configure_mesh()
        .x_desc("round trip on the wire (µs)")
        .y_desc("offset − truth (µs)")
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    // The wedge: |error| ≤ rtt/2.
    chart
        .draw_series(LineSeries::new(
            [(x_max, x_max / 2.0), (0.0, 0.0), (x_max, -x_max / 2.0)],
            BLACK.mix(0.4).stroke_width(1),
        ))?
        .label("Cristian's wedge (±rtt/2)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK.mix(0.4)));
    chart
        .draw_series(LineSeries::new(
            [(0.0, 0.0), (x_max, 0.0)],
            GREEN.stroke_width(2),
        ))?
        .label("truth")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], GREEN.stroke_width(2)));
    chart
        .draw_series(
            samples
                .iter()
                .map(|&p| Circle::new(p, 2, BLUE.mix(0.45).filled())),
        )?
        .label("samples")
        .legend(|(x, y)| Circle::new((x + 9, y), 3, BLUE.mix(0.45).filled()));
    chart
        .draw_series(
            estimates
                .iter()
                .map(|&p| Cross::new(p, 5, RED.stroke_width(2))),
        )?
        .label("estimate (x = 2 × its bound)")
        .legend(|(x, y)| Cross::new((x + 9, y), 4, RED.stroke_width(2)));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}
