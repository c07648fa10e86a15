//! The lab's drawings, as SVG: the wedge scattergram of one-shot runs, and
//! a watch's error and bound over time.
//!
//! The wedge scattergram: each sample's offset against its round trip.
//!
//! A sample with round trip `rtt` can be off the truth by at most `rtt/2`,
//! so the samples fill a wedge whose apex is the true offset; the quiet
//! samples sit near the apex, queueing pushes samples out along the edges.
//! Each run's estimate is drawn at twice its stated bound: inside the wedge
//! means the bound was honest, and low means it was tight.

use crate::accuracy::Run;
use crate::watch::{WatchRun, WatchSummary};
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

/// Draws one watch over time to an SVG file: each answer's |error| as a
/// point (a cross where its bound missed the truth), the bound as a line,
/// twice the second half's median |error| (the convergence limit), and the
/// step, if any. The y axis is logarithmic, in microseconds.
pub fn watch(
    path: &Path,
    title: &str,
    run: &WatchRun,
    summary: &WatchSummary,
) -> Result<(), Box<dyn std::error::Error>> {
    let us = |ns: i64| ns.unsigned_abs() as f64 / 1e3;
    let answers: Vec<_> = run.lines.iter().filter(|l| l.synced).collect();
    let x_max = run
        .lines
        .iter()
        .map(|l| l.t)
        .fold(2.0 * run.half, f64::max)
        .max(1.0);
    let values = answers
        .iter()
        .flat_map(|l| [us(l.error_ns), us(l.bound_ns)])
        .filter(|v| *v > 0.0);
    let (lo, hi) = values.fold((f64::MAX, 0.0_f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    // Whole decades, so the axis reads 0.1, 1, 10, ... µs.
    let lo = if lo == f64::MAX { 0.01 } else { lo };
    let hi = hi.max(lo * 10.0);
    let y_min = 10f64.powf(lo.log10().floor());
    let y_max = 10f64.powf(hi.log10().ceil());
    // A zero error would sit at minus infinity: put it on the floor.
    let at_least = |v: f64| v.max(y_min);

    let root = SVGBackend::new(path, (820, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, (y_min..y_max).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("time since fient started (s)")
        .y_desc("µs (log scale)")
        // Key points of a log axis come out as 0.09999999...: round them.
        .y_label_formatter(&|v| format!("{}", (v * 1e6).round() / 1e6))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    chart
        .draw_series(LineSeries::new(
            answers.iter().map(|l| (l.t, at_least(us(l.bound_ns)))),
            RGBColor(230, 120, 0).stroke_width(2),
        ))?
        .label("error bound")
        .legend(|(x, y)| {
            PathElement::new([(x, y), (x + 18, y)], RGBColor(230, 120, 0).stroke_width(2))
        });
    chart
        .draw_series(
            answers
                .iter()
                .filter(|l| l.held)
                .map(|l| Circle::new((l.t, at_least(us(l.error_ns))), 3, BLUE.filled())),
        )?
        .label("|offset − truth|")
        .legend(|(x, y)| Circle::new((x + 9, y), 3, BLUE.filled()));
    if answers.iter().any(|l| !l.held) {
        chart
            .draw_series(
                answers
                    .iter()
                    .filter(|l| !l.held)
                    .map(|l| Cross::new((l.t, at_least(us(l.error_ns))), 5, RED.stroke_width(2))),
            )?
            .label("|offset − truth|, bound missed")
            .legend(|(x, y)| Cross::new((x + 9, y), 4, RED.stroke_width(2)));
    }
    if let Some(m) = summary.median_abs_error_ns {
        let limit = at_least(us(2 * m));
        chart
            .draw_series(LineSeries::new(
                [(0.0, limit), (x_max, limit)],
                BLACK.mix(0.35).stroke_width(1),
            ))?
            .label("2 × median |error| of the second half")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK.mix(0.35)));
    }
    if let Some(at) = run.step_at {
        chart
            .draw_series(LineSeries::new(
                [(at, y_min), (at, y_max)],
                MAGENTA.mix(0.6).stroke_width(1),
            ))?
            .label("server's time jumps 10 ms")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], MAGENTA.mix(0.6)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present()?;
    Ok(())
}
