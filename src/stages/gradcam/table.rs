//! What every copy of a `gradcam` stage (`workers: N`) adds to one table:
//! `heatmaps.csv`, a line per image, and `heatmaps.npy`, the heatmaps
//! themselves `[N, h, w]` in the same order, so they can be checked
//! against a reference. The copies finish in any order; the rows go out in
//! input order (the source's `seq`), written by the last copy to finish
//! under `.partial` names and renamed, so an interrupted or failed run
//! never leaves a table that looks complete.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::npy::NpyWriter;
use crate::stage::{RunSignals, StageError};

pub const CSV: &str = "heatmaps.csv";
pub const NPY: &str = "heatmaps.npy";

pub const HEADER: &str = "path,label,class,probability,predicted,peak_row,peak_col,peak_y,peak_x,picture";

/// One image's line.
#[derive(Debug, Clone)]
pub struct Row {
    /// Position in the source's order.
    pub seq: u64,
    pub path: PathBuf,
    /// Its class folder, when the source knows it.
    pub label: Option<String>,
    /// The class the heatmap is of, and the model's probability of it.
    pub class: String,
    pub probability: f32,
    pub predicted: String,
    /// The peak's cell (row, column) and its centre in the photo (y, x);
    /// `None` for an all-zero heatmap.
    pub peak: Option<((usize, usize), (u32, u32))>,
    pub picture: PathBuf,
    pub shape: [usize; 2],
    pub values: Vec<f32>,
}

pub struct Table {
    dir: PathBuf,
    copies: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    rows: Vec<Row>,
    finished: usize,
}

impl Table {
    /// A table in `dir` that `copies` stage copies add to.
    pub fn new(dir: &Path, copies: usize) -> Table {
        Table { dir: dir.to_path_buf(), copies: copies.max(1), state: Mutex::new(State::default()) }
    }

    fn state(&self) -> Result<std::sync::MutexGuard<'_, State>, StageError> {
        self.state.lock().map_err(|_| StageError::fatal("gradcam: a worker panicked"))
    }

    pub fn push(&self, row: Row) -> Result<(), StageError> {
        let mut state = self.state()?;
        if let Some(first) = state.rows.first()
            && first.shape != row.shape
        {
            return Err(StageError::fatal(format!(
                "{}: a {:?} heatmap after {:?} ones: every image must reach the model at one size",
                row.path.display(),
                row.shape,
                first.shape
            )));
        }
        state.rows.push(row);
        Ok(())
    }

    /// One copy is done; the last writes the table (not after an
    /// interrupt or a failure). Returns the lines written, if it did.
    pub fn finish_copy(&self, signals: &RunSignals) -> Result<Option<usize>, StageError> {
        let mut state = self.state()?;
        state.finished += 1;
        if state.finished < self.copies || signals.interrupted() || signals.aborted() {
            return Ok(None);
        }
        let mut rows = std::mem::take(&mut state.rows);
        rows.sort_by(|a, b| (a.seq, &a.path).cmp(&(b.seq, &b.path)));
        self.write(&rows).map_err(|e| StageError::fatal(format!("{}: {e}", self.dir.display())))?;
        Ok(Some(rows.len()))
    }

    fn write(&self, rows: &[Row]) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let csv = self.dir.join(CSV);
        let partial = self.dir.join(format!("{CSV}.partial"));
        let mut w = std::io::BufWriter::new(std::fs::File::create(&partial)?);
        writeln!(w, "{HEADER}")?;
        for r in rows {
            let (cell, px) = match r.peak {
                Some(((row, col), (y, x))) => ([row.to_string(), col.to_string()], [y.to_string(), x.to_string()]),
                None => Default::default(),
            };
            let fields = [
                field(&r.path.display().to_string()),
                field(r.label.as_deref().unwrap_or("")),
                field(&r.class),
                format!("{:.6}", r.probability),
                field(&r.predicted),
                cell[0].clone(),
                cell[1].clone(),
                px[0].clone(),
                px[1].clone(),
                field(&r.picture.display().to_string()),
            ];
            writeln!(w, "{}", fields.join(","))?;
        }
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        let shape = rows.first().map_or([0, 0], |r| r.shape);
        let mut npy = NpyWriter::create(&self.dir.join(NPY), &shape)?;
        for r in rows {
            npy.push(&r.values)?;
        }
        npy.finish()?;
        std::fs::rename(partial, csv)
    }
}

fn field(s: &str) -> String {
    if s.contains([',', '"', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: u64, name: &str) -> Row {
        Row {
            seq,
            path: PathBuf::from(name),
            label: Some("cats".into()),
            class: "dogs".into(),
            probability: 0.25,
            predicted: "cats".into(),
            peak: (seq != 2).then_some(((1, 0), (75, 20))),
            picture: PathBuf::from(format!("out/{name}.png")),
            shape: [2, 1],
            values: vec![seq as f32, 1.0],
        }
    }

    #[test]
    fn rows_from_every_copy_come_out_in_input_order_when_the_last_copy_finishes() {
        let dir = tempfile::tempdir().unwrap();
        let table = Table::new(dir.path(), 2);
        let signals = RunSignals::default();
        table.push(row(2, "b,c.jpg")).unwrap();
        table.push(row(0, "a.jpg")).unwrap();
        assert_eq!(table.finish_copy(&signals).unwrap(), None, "one copy still runs");
        assert!(!dir.path().join(CSV).exists());
        table.push(row(1, "z.jpg")).unwrap();
        assert_eq!(table.finish_copy(&signals).unwrap(), Some(3));
        let text = std::fs::read_to_string(dir.path().join(CSV)).unwrap();
        let want = format!(
            "{HEADER}\na.jpg,cats,dogs,0.250000,cats,1,0,75,20,out/a.jpg.png\n\
             z.jpg,cats,dogs,0.250000,cats,1,0,75,20,out/z.jpg.png\n\
             \"b,c.jpg\",cats,dogs,0.250000,cats,,,,,\"out/b,c.jpg.png\"\n"
        );
        assert_eq!(text, want);
        let (shape, values) = crate::npy::read_f32(&dir.path().join(NPY)).unwrap();
        assert_eq!((shape, values), (vec![3, 2, 1], vec![0.0, 1.0, 1.0, 1.0, 2.0, 1.0]));
    }

    #[test]
    fn an_interrupted_run_writes_no_table_and_sizes_must_agree() {
        let dir = tempfile::tempdir().unwrap();
        let table = Table::new(dir.path(), 1);
        table.push(row(0, "a.jpg")).unwrap();
        let mut other = row(1, "b.jpg");
        other.shape = [1, 2];
        assert!(table.push(other).is_err());
        let signals = RunSignals::default();
        signals.interrupted.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(table.finish_copy(&signals).unwrap(), None);
        assert!(!dir.path().join(CSV).exists() && !dir.path().join(NPY).exists());
    }
}
