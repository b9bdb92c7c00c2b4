//! The scan report as a JSON document, written as the scan runs (memory stays bounded however
//! many extents there are):
//! `{"page_size":4096,"disks":[{"id","dev":"MAJ:MIN","path","size_bytes"}],
//!   "cache_extents":[{"pfn","pages","disk":<disk id>,"offset"}],"summary":{…}}`.

use std::io::Write;

use serde::Serialize;

use crate::disks::Disk;
use crate::extents::CacheExtent;
use crate::frames::PAGE_SIZE;
use crate::scan::{ScanEvent, Summary};

/// What can go wrong while writing the report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Writing failed.
    #[error("writing the report: {0}")]
    Io(#[from] std::io::Error),
    /// Encoding failed.
    #[error("encoding the report: {0}")]
    Json(#[from] serde_json::Error),
    /// An extent named a disk the table does not have.
    #[error("extent names disk {0}, which is not in the disk table")]
    UnknownDisk(u32),
}

#[derive(Serialize)]
struct JsonDisk<'a> {
    id: &'a str,
    dev: String,
    path: String,
    size_bytes: u64,
}

#[derive(Serialize)]
struct JsonExtent<'a> {
    pfn: u64,
    pages: u64,
    disk: &'a str,
    offset: u64,
}

/// Writes the JSON document from scan events.
pub struct JsonReport<W: Write> {
    out: W,
    disks: Vec<Disk>,
    extents_written: u64,
}

impl<W: Write> JsonReport<W> {
    /// A report written to `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            disks: Vec::new(),
            extents_written: 0,
        }
    }

    /// Takes one scan event.
    pub fn event(&mut self, event: ScanEvent) -> Result<(), ReportError> {
        match event {
            ScanEvent::Disks(disks) => {
                write!(self.out, "{{\"page_size\":{PAGE_SIZE},\"disks\":")?;
                let table: Vec<JsonDisk<'_>> = disks
                    .iter()
                    .map(|d| JsonDisk {
                        id: &d.id,
                        dev: format!("{}:{}", d.dev.0, d.dev.1),
                        path: d.path.display().to_string(),
                        size_bytes: d.size_bytes,
                    })
                    .collect();
                serde_json::to_writer(&mut self.out, &table)?;
                write!(self.out, ",\"cache_extents\":[")?;
                self.disks = disks;
            }
            ScanEvent::Extents(batch) => {
                for extent in batch {
                    self.extent(&extent)?;
                }
            }
        }
        Ok(())
    }

    fn extent(&mut self, extent: &CacheExtent) -> Result<(), ReportError> {
        let disk = self
            .disks
            .get(extent.disk as usize)
            .ok_or(ReportError::UnknownDisk(extent.disk))?;
        if self.extents_written > 0 {
            self.out.write_all(b",")?;
        }
        serde_json::to_writer(
            &mut self.out,
            &JsonExtent {
                pfn: extent.pfn,
                pages: extent.pages,
                disk: &disk.id,
                offset: extent.offset,
            },
        )?;
        self.extents_written += 1;
        Ok(())
    }

    /// Closes the document with the summary.
    pub fn finish(mut self, summary: &Summary) -> Result<(), ReportError> {
        write!(self.out, "],\"summary\":")?;
        serde_json::to_writer(&mut self.out, summary)?;
        writeln!(self.out, "}}")?;
        self.out.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_names_disks_by_id() {
        let mut buf = Vec::new();
        let mut report = JsonReport::new(&mut buf);
        report
            .event(ScanEvent::Disks(vec![Disk {
                id: "root".into(),
                dev: (254, 0),
                path: "/dev/vda".into(),
                size_bytes: 1 << 30,
            }]))
            .unwrap();
        let extent = CacheExtent {
            pfn: 7,
            pages: 2,
            disk: 0,
            offset: 8192,
        };
        report
            .event(ScanEvent::Extents(vec![extent, extent]))
            .unwrap();
        report.finish(&Summary::default()).unwrap();
        let doc: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(doc["page_size"], 4096);
        assert_eq!(doc["disks"][0]["dev"], "254:0");
        assert_eq!(doc["cache_extents"][1]["disk"], "root");
        assert_eq!(doc["cache_extents"][1]["offset"], 8192);
        assert_eq!(doc["summary"]["pages_reported"], 0);

        let mut report = JsonReport::new(Vec::new());
        report.event(ScanEvent::Disks(Vec::new())).unwrap();
        assert!(report.event(ScanEvent::Extents(vec![extent])).is_err());
    }
}
