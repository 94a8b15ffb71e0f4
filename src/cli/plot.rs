//! SVG pictures: `xent bench --plot` (throughput per shape and pass against the copy and
//! read rooflines measured in the same run) and `xent eval --plot` (a reliability diagram
//! from the calibration bins, and a histogram of the row losses).
//!
//! Plotters' SVG backend only: text is written as `<text>` elements, so no font file or
//! system library is needed. Each picture is rendered into memory, written to a temporary
//! file beside the target and renamed over it, so a failed run leaves no half-written file.

use std::io::Write;
use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use xent::gpu::bench::Pass;
use xent::{Error, Metrics};

/// One measured line of `xent bench`, as the picture draws it.
#[derive(Clone, Debug)]
pub struct BenchPoint {
    /// `gpu` or `cpu`.
    pub device: String,
    /// The adapter (or the CPU path) as the report names it.
    pub adapter: String,
    pub rows: usize,
    pub classes: usize,
    pub pass: Pass,
    /// The option set's name (`plain`, `softcap`, ...).
    pub options: String,
    /// `device` (kernels on data already on the GPU) or `host` (whole API calls).
    pub api: String,
    /// Median time of the measurement.
    pub median_ms: f64,
    /// The in-run copy kernel's median time for the same N×V (GPU device rows only).
    pub copy_ms: Option<f64>,
    /// The in-run read-only reduction's median time (GPU device rows, forward only).
    pub read_ms: Option<f64>,
}

impl BenchPoint {
    fn elems(&self) -> f64 {
        self.rows as f64 * self.classes as f64
    }

    /// GB/s of the least bytes the pass must move: 4·N·V forward (one f32 read),
    /// 12·N·V forward-backward (2 reads + 1 write), as the bench table counts them.
    pub fn gb_per_s(&self) -> f64 {
        let per_elem = match self.pass {
            Pass::Forward => 4.0,
            Pass::ForwardBackward => 12.0,
        };
        gb_per_s(per_elem * self.elems(), self.median_ms)
    }

    /// The copy roofline in GB/s: 8·N·V bytes (1 read + 1 write) over its time.
    fn copy_gb_per_s(&self) -> Option<f64> {
        self.copy_ms.map(|ms| gb_per_s(8.0 * self.elems(), ms))
    }

    /// The read roofline in GB/s: 4·N·V bytes over its time.
    fn read_gb_per_s(&self) -> Option<f64> {
        self.read_ms.map(|ms| gb_per_s(4.0 * self.elems(), ms))
    }

    fn shape(&self) -> String {
        format!("{}×{}", self.rows, self.classes)
    }
}

fn gb_per_s(bytes: f64, ms: f64) -> f64 {
    bytes / (ms * 1e-3) / 1e9
}

/// Positive and finite: what a log axis can show.
fn drawable(v: f64) -> bool {
    v.is_finite() && v > 0.0
}

/// The error of a picture that could not be drawn or written.
fn io_error(path: &Path, source: std::io::Error) -> Error {
    Error::Io { path: path.to_path_buf(), source }
}

fn draw_error<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> Error + '_ {
    move |e| io_error(path, std::io::Error::other(format!("drawing the SVG picture: {e}")))
}

/// Writes `svg` to `path` through a temporary file in the same directory and a rename;
/// on any error the temporary file is removed and `path` is left as it was.
fn write_atomic(path: &Path, svg: &str) -> xent::Result<()> {
    let name = path.file_name().ok_or_else(|| {
        io_error(path, std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"))
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(svg.as_bytes())?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    written.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_error(path, e)
    })
}

/// A fitting number for a label: "n/a" for NaN.
fn fmt(v: f64, digits: usize) -> String {
    if v.is_finite() { format!("{v:.digits$}") } else { "n/a".to_string() }
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

/// A note written in the middle of an area (for empty inputs).
fn note<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    text: &str,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let (w, h) = area.dim_in_pixel();
    let style =
        ("sans-serif", 18).into_font().color(&RGBColor(90, 90, 90)).pos(Pos::new(HPos::Center, VPos::Center));
    area.draw_text(text, &style, (w as i32 / 2, h as i32 / 2))
}

/// One line of the bench picture: a measured series, or a roofline of one adapter.
struct Series {
    name: String,
    color: RGBColor,
    roofline: bool,
    /// (shape index, GB/s).
    points: Vec<(usize, f64)>,
}

fn color(i: usize) -> RGBColor {
    const COLORS: [RGBColor; 10] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
    ];
    COLORS[i % COLORS.len()]
}

/// The bench series: one per device (and adapter, when a device has several), pass,
/// option set and API; then per GPU adapter its copy and read rooflines, the best of the
/// run's measurements of each shape.
fn bench_series(results: &[BenchPoint], shapes: &[String]) -> Vec<Series> {
    let shape_of = |p: &BenchPoint| shapes.iter().position(|s| *s == p.shape()).unwrap_or(0);
    let adapters_of = |device: &str| {
        let mut a: Vec<&str> =
            results.iter().filter(|p| p.device == device).map(|p| p.adapter.as_str()).collect();
        a.dedup();
        a.sort_unstable();
        a.dedup();
        a
    };
    let mut keys: Vec<(String, String, Pass, String, String)> = Vec::new();
    for p in results {
        let key = (p.device.clone(), p.adapter.clone(), p.pass, p.options.clone(), p.api.clone());
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    let mut series = Vec::new();
    for (i, (device, adapter, pass, options, api)) in keys.iter().enumerate() {
        let mut name = device.clone();
        if adapters_of(device).len() > 1 {
            name += &format!(" [{}]", shorten(adapter, 24));
        }
        name += &format!(" {}", pass.name());
        if options != "plain" {
            name += &format!(" {options}");
        }
        if device == "gpu" && api == "host" {
            name += " (host API)";
        }
        let points = results
            .iter()
            .filter(|p| {
                (&p.device, &p.adapter, p.pass, &p.options, &p.api) == (device, adapter, *pass, options, api)
            })
            .map(|p| (shape_of(p), p.gb_per_s()))
            .filter(|&(_, v)| drawable(v))
            .collect();
        series.push(Series { name, color: color(i), roofline: false, points });
    }
    let gpu_adapters = adapters_of("gpu");
    for (j, adapter) in gpu_adapters.iter().enumerate() {
        for (kind, of) in [
            ("copy", BenchPoint::copy_gb_per_s as fn(&BenchPoint) -> Option<f64>),
            ("read", BenchPoint::read_gb_per_s),
        ] {
            let mut best: Vec<Option<f64>> = vec![None; shapes.len()];
            for p in results.iter().filter(|p| p.device == "gpu" && p.adapter == *adapter) {
                if let Some(v) = of(p).filter(|&v| drawable(v)) {
                    let b = &mut best[shape_of(p)];
                    *b = Some(b.map_or(v, |b: f64| b.max(v)));
                }
            }
            let points: Vec<(usize, f64)> =
                best.iter().enumerate().filter_map(|(i, b)| b.map(|v| (i, v))).collect();
            if points.is_empty() {
                continue;
            }
            let mut name = format!("{kind} roofline");
            if gpu_adapters.len() > 1 {
                name += &format!(" [{}]", shorten(adapter, 24));
            }
            let c = if kind == "copy" { RGBColor(60, 60, 60) } else { RGBColor(150, 150, 150) };
            let c = if j == 0 { c } else { color(keys.len() + j) };
            series.push(Series { name, color: c, roofline: true, points });
        }
    }
    series
}

/// `xent bench --plot`: the throughput of each measured series per shape (GB/s of the
/// least bytes the pass moves, on a log axis), with each GPU adapter's copy and read
/// rooflines from the same run as horizontal segments over their shapes.
pub fn bench_svg(path: &Path, results: &[BenchPoint]) -> xent::Result<()> {
    let mut shapes: Vec<String> = Vec::new();
    for p in results {
        if !shapes.contains(&p.shape()) {
            shapes.push(p.shape());
        }
    }
    let series = bench_series(results, &shapes);
    let mut devices: Vec<String> = Vec::new();
    for p in results {
        let d = format!("{}: {}", p.device, p.adapter);
        if !devices.contains(&d) {
            devices.push(d);
        }
    }
    let mut footer = devices;
    footer.push(
        "GB/s: least bytes moved over the median time: forward 4·N·V (one f32 read), forward-backward 12·N·V (2 reads + 1 write);"
            .to_string(),
    );
    footer.push(
        "copy roofline: an in-run kernel moving N×V f32 once each way (8·N·V bytes); read roofline: an in-run read-only reduction (4·N·V bytes)."
            .to_string(),
    );
    let height = 600 + 20 * footer.len() as u32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1200, height)).into_drawing_area();
        draw_bench(&root, &shapes, &series, &footer).map_err(draw_error(path))?;
        root.present().map_err(draw_error(path))?;
    }
    write_atomic(path, &svg)
}

fn draw_bench<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    shapes: &[String],
    series: &[Series],
    footer: &[String],
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let root = root.titled(
        "xent bench: cross-entropy throughput per shape and pass (median times), with the in-run rooflines",
        ("sans-serif", 20),
    )?;
    let (_, h) = root.dim_in_pixel();
    let (main, foot) = root.split_vertically(h - 20 * footer.len() as u32 - 10);
    for (i, line) in footer.iter().enumerate() {
        foot.draw_text(line, &("sans-serif", 13).into_font().color(&BLACK), (20, 5 + 20 * i as i32))?;
    }
    let values: Vec<f64> = series.iter().flat_map(|s| s.points.iter().map(|&(_, v)| v)).collect();
    if shapes.is_empty() || values.is_empty() {
        return note(&main, "no measurements: nothing to draw");
    }
    let (plot, legend) = main.split_horizontally(880);
    // Whole decades, so that the log axis always has ticks to label.
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min) / 1.2;
    let hi = values.iter().copied().fold(0.0, f64::max) * 1.2;
    // (A hair wider, so that the end decades get their labels too.)
    let (lo, hi) = (10f64.powf(lo.log10().floor()) * 0.99, 10f64.powf(hi.log10().ceil()) * 1.01);
    let k = shapes.len();
    let mut chart = ChartBuilder::on(&plot)
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5f64..(k as f64 - 0.5), (lo..hi).log_scale())?;
    let label = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < k {
            shapes[i as usize].clone()
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .x_labels(k.max(2))
        .x_label_formatter(&label)
        .y_label_formatter(&|v: &f64| format!("{v}"))
        .disable_x_mesh()
        .x_desc("shape: rows N × classes V")
        .y_desc("GB/s (least bytes moved ÷ median time)")
        .light_line_style(RGBColor(238, 238, 238))
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 15))
        .draw()?;
    for s in series {
        let style = ShapeStyle::from(&s.color).stroke_width(2);
        if s.roofline {
            for &(i, v) in &s.points {
                let seg = [(i as f64 - 0.45, v), (i as f64 + 0.45, v)];
                chart.draw_series(std::iter::once(DashedPathElement::new(seg, 8, 5, style)))?;
            }
        } else {
            chart.draw_series(LineSeries::new(s.points.iter().map(|&(i, v)| (i as f64, v)), style))?;
            chart.draw_series(
                s.points.iter().map(|&(i, v)| Circle::new((i as f64, v), 4, s.color.filled())),
            )?;
        }
    }
    // The legend, beside the chart so that it never hides a point.
    let text = ("sans-serif", 13).into_font().color(&BLACK).pos(Pos::new(HPos::Left, VPos::Center));
    for (i, s) in series.iter().enumerate() {
        let y = 40 + 24 * i as i32;
        let style = ShapeStyle::from(&s.color).stroke_width(2);
        if s.roofline {
            legend.draw(&DashedPathElement::new([(10, y), (45, y)], 8, 5, style))?;
        } else {
            legend.draw(&PathElement::new(vec![(10, y), (45, y)], style))?;
            legend.draw(&Circle::new((27, y), 4, s.color.filled()))?;
        }
        legend.draw_text(&s.name, &text, (55, y))?;
    }
    Ok(())
}

/// The corners of a bar over [lo, hi) up to `y`, a little narrower than its bin.
#[allow(dead_code)]
fn inset(lo: f64, hi: f64, y: f64) -> ((f64, f64), (f64, f64)) {
    let pad = (hi - lo) * 0.04;
    ((lo + pad, 0.0), (hi - pad, y))
}

/// Per bin: (lower edge, upper edge, count, accuracy, mean confidence).
#[allow(dead_code)]
fn bins(metrics: &Metrics) -> Vec<(f64, f64, u64, f64, f64)> {
    let b = metrics.sums.bins.len();
    metrics
        .sums
        .bins
        .iter()
        .enumerate()
        .map(|(i, bin)| {
            let (lo, hi) = (i as f64 / b as f64, (i + 1) as f64 / b as f64);
            let c = bin.count as f64;
            let (acc, conf) = if bin.count > 0 {
                (bin.correct as f64 / c, bin.confidence / c)
            } else {
                (f64::NAN, f64::NAN)
            };
            (lo, hi, bin.count, acc, conf)
        })
        .collect()
}

/// `xent eval --plot`: a reliability diagram from the calibration bins (accuracy per bin
/// as bars against the bin, the diagonal y = x, the mean confidence per bin as points),
/// the rows per bin in a small panel below, and — with `row_losses` — a histogram of the
/// finite row losses beside them (the caption counts the NaN/inf ones skipped).
pub fn calibration_svg(path: &Path, metrics: &Metrics, row_losses: Option<&[f32]>) -> xent::Result<()> {
    let width = if row_losses.is_some() { 1200 } else { 720 };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, 760)).into_drawing_area();
        draw_calibration(&root, metrics, row_losses).map_err(draw_error(path))?;
        root.present().map_err(draw_error(path))?;
    }
    write_atomic(path, &svg)
}

#[allow(dead_code)]
fn draw_calibration<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    metrics: &Metrics,
    row_losses: Option<&[f32]>,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let bins = bins(metrics);
    let title = format!(
        "calibration: accuracy {}, ECE {} ({} counted rows, {} equal-width bins)",
        if metrics.accuracy.is_finite() {
            format!("{:.2} %", metrics.accuracy * 100.0)
        } else {
            "n/a".into()
        },
        fmt(metrics.ece, 4),
        metrics.counted_rows,
        bins.len()
    );
    let root = root.titled(&title, ("sans-serif", 20))?;
    let (left, right) = match row_losses {
        Some(_) => {
            let (l, r) = root.split_horizontally(700);
            (l, Some(r))
        }
        None => (root.clone(), None),
    };
    let (_, h) = left.dim_in_pixel();
    let (top, bottom) = left.split_vertically(h * 7 / 10);
    let any = bins.iter().any(|b| b.2 > 0);

    // The reliability diagram.
    let mut chart = ChartBuilder::on(&top)
        .caption("reliability diagram", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0f64..1.0, 0.0f64..1.0)?;
    chart
        .configure_mesh()
        .x_desc("confidence (top-1 probability)")
        .y_desc("accuracy (correct / count)")
        .light_line_style(RGBColor(238, 238, 238))
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 14))
        .draw()?;
    let bar = RGBColor(31, 119, 180);
    chart
        .draw_series(bins.iter().filter(|b| b.2 > 0).map(|&(lo, hi, _, acc, _)| {
            Rectangle::new([inset(lo, hi, 0.0).0, inset(lo, hi, acc).1], bar.mix(0.55).filled())
        }))?
        .label("accuracy per bin")
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 18, y + 5)], bar.mix(0.55).filled()));
    chart
        .draw_series(std::iter::once(DashedPathElement::new([(0.0, 0.0), (1.0, 1.0)], 6, 4, &BLACK)))?
        .label("y = x (perfect calibration)")
        .legend(|(x, y)| DashedPathElement::new([(x, y), (x + 18, y)], 6, 4, BLACK));
    let red = RGBColor(214, 39, 40);
    chart
        .draw_series(
            bins.iter()
                .filter(|b| b.2 > 0)
                .map(|&(lo, hi, _, _, conf)| Circle::new(((lo + hi) / 2.0, conf), 4, red.filled())),
        )?
        .label("mean confidence per bin")
        .legend(move |(x, y)| Circle::new((x + 9, y), 4, red.filled()));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()?;
    if !any {
        note(&top, "no counted rows: no calibration to draw")?;
    }

    // The rows per bin.
    let max = bins.iter().map(|b| b.2).max().unwrap_or(0).max(1) as f64;
    let mut counts = ChartBuilder::on(&bottom)
        .caption("rows per bin", ("sans-serif", 14))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0f64..1.0, 0.0..max * 1.2)?;
    counts
        .configure_mesh()
        .y_desc("rows")
        .y_labels(4)
        .y_label_formatter(&|v: &f64| format!("{v:.0}"))
        .light_line_style(RGBColor(238, 238, 238))
        .label_style(("sans-serif", 12))
        .axis_desc_style(("sans-serif", 13))
        .draw()?;
    let grey = RGBColor(127, 127, 127);
    counts.draw_series(bins.iter().filter(|b| b.2 > 0).map(|&(lo, hi, c, _, _)| {
        let ((x0, _), (x1, _)) = inset(lo, hi, 0.0);
        Rectangle::new([(x0, 0.0), (x1, c as f64)], grey.mix(0.6).filled())
    }))?;
    if bins.len() <= 20 {
        let style = ("sans-serif", 11).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Bottom));
        counts.draw_series(bins.iter().filter(|b| b.2 > 0).map(|&(lo, hi, c, _, _)| {
            Text::new(c.to_string(), ((lo + hi) / 2.0, c as f64), style.clone())
        }))?;
    }

    // The row losses.
    if let (Some(area), Some(losses)) = (right, row_losses) {
        draw_losses(&area, losses)?;
    }
    Ok(())
}

#[allow(dead_code)]
fn draw_losses<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    losses: &[f32],
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let finite: Vec<f64> = losses.iter().filter(|v| v.is_finite()).map(|&v| f64::from(v)).collect();
    let skipped = losses.len() - finite.len();
    let caption = format!("row losses: {} rows, {} NaN/inf skipped", finite.len(), skipped);
    let (mut lo, mut hi) =
        finite.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    if finite.is_empty() {
        (lo, hi) = (0.0, 1.0);
    } else if hi - lo < 1e-9 * hi.abs().max(1.0) {
        (lo, hi) = (lo - 0.5, hi + 0.5);
    }
    let nb = ((finite.len() as f64).sqrt().ceil() as usize).clamp(1, 60);
    let width = (hi - lo) / nb as f64;
    let mut counts = vec![0u64; nb];
    for &v in &finite {
        counts[(((v - lo) / width) as usize).min(nb - 1)] += 1;
    }
    let max = counts.iter().copied().max().unwrap_or(0).max(1) as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(&caption, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(lo..hi, 0.0..max * 1.1)?;
    chart
        .configure_mesh()
        .x_desc("row loss")
        .y_desc("rows")
        .y_label_formatter(&|v: &f64| format!("{v:.0}"))
        .light_line_style(RGBColor(238, 238, 238))
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 14))
        .draw()?;
    let color = RGBColor(44, 160, 44);
    chart.draw_series(counts.iter().enumerate().filter(|&(_, &c)| c > 0).map(|(i, &c)| {
        let x0 = lo + i as f64 * width;
        Rectangle::new([(x0, 0.0), (x0 + width, c as f64)], color.mix(0.6).filled())
    }))?;
    if finite.is_empty() {
        note(area, "no finite row loss to draw")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use xent::MetricsSpec;
    use xent::metrics::{CalibrationBin, MetricSums};

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("xent-plot-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut f: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        f.sort();
        f
    }

    fn metrics(bins: &[(u64, f64, u64)]) -> Metrics {
        let mut sums = MetricSums::new(&MetricsSpec::new().ece_bins(bins.len()));
        for (b, &(count, confidence, correct)) in sums.bins.iter_mut().zip(bins) {
            *b = CalibrationBin { count, confidence, correct };
        }
        sums.counted = bins.iter().map(|b| b.0).sum();
        sums.correct = bins.iter().map(|b| b.2).sum();
        sums.finish()
    }

    fn svg(path: &Path) -> String {
        let s = std::fs::read_to_string(path).unwrap();
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"), "{s}");
        s
    }

    #[test]
    fn calibration_with_losses() {
        let d = scratch("calibration");
        let m = metrics(&[(0, 0.0, 0), (4, 1.4, 1), (10, 6.5, 6), (20, 18.0, 19)]);
        let losses = [0.1, 0.5, f32::NAN, 2.0, f32::INFINITY, 0.7];
        calibration_svg(&d.join("c.svg"), &m, Some(&losses)).unwrap();
        let s = svg(&d.join("c.svg"));
        assert!(s.contains(&format!("ECE {:.4}", m.ece)), "{s}");
        assert!(s.contains(&format!("accuracy {:.2} %", m.accuracy * 100.0)), "{s}");
        assert!(s.contains("2 NaN/inf skipped"), "{s}");
        assert!(s.contains("mean confidence per bin") && s.contains("rows per bin"), "{s}");
        assert_eq!(files(&d), ["c.svg"]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn empty_inputs_give_a_picture_with_a_note() {
        let d = scratch("empty");
        calibration_svg(&d.join("c.svg"), &metrics(&[(0, 0.0, 0); 15]), Some(&[f32::NAN])).unwrap();
        let s = svg(&d.join("c.svg"));
        assert!(
            s.contains("no counted rows") && s.contains("no finite row loss") && s.contains("accuracy n/a"),
            "{s}"
        );
        calibration_svg(&d.join("none.svg"), &metrics(&[]), None).unwrap();
        svg(&d.join("none.svg"));
        bench_svg(&d.join("b.svg"), &[]).unwrap();
        assert!(svg(&d.join("b.svg")).contains("no measurements"));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn rooflines_and_series() {
        let d = scratch("bench");
        let point = |device: &str, pass, rows, median_ms, copy_ms, read_ms| BenchPoint {
            device: device.into(),
            adapter: format!("{device} <adapter> & co"),
            rows,
            classes: 1000,
            pass,
            options: "plain".into(),
            api: if device == "gpu" { "device".into() } else { "host".into() },
            median_ms,
            copy_ms,
            read_ms,
        };
        let results = [
            point("gpu", Pass::Forward, 64, 0.5, Some(0.6), Some(0.4)),
            point("gpu", Pass::ForwardBackward, 64, 1.5, Some(0.6), None),
            point("gpu", Pass::Forward, 128, 0.9, Some(1.1), Some(0.7)),
            point("cpu", Pass::Forward, 64, 0.0, None, None),
        ];
        bench_svg(&d.join("b.svg"), &results).unwrap();
        let s = svg(&d.join("b.svg"));
        for name in
            ["gpu forward", "gpu forward-backward", "copy roofline", "read roofline", "64×1000", "128×1000"]
        {
            assert!(s.contains(name), "{name} in {s}");
        }
        // Escaped, and a zero time (infinite GB/s) is left out rather than drawn.
        assert!(s.contains("&lt;adapter&gt; &amp; co"), "{s}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_failed_write_leaves_nothing() {
        let d = scratch("fail");
        let e = bench_svg(&d.join("missing").join("b.svg"), &[]).unwrap_err();
        assert!(matches!(e, Error::Io { .. }) && e.to_string().contains("missing"), "{e}");
        // A directory in the way: the rename fails, the temporary file is removed.
        std::fs::create_dir(d.join("b.svg")).unwrap();
        assert!(bench_svg(&d.join("b.svg"), &[]).is_err());
        assert_eq!(files(&d), ["b.svg"]);
        let _ = std::fs::remove_dir_all(&d);
    }
}
