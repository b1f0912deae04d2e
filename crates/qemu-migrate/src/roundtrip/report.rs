//! A round-trip report on one screen, and as JUnit XML for CI systems.

use std::fmt;

use super::Report;

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let qemus = if self.qemu == self.restore_qemu {
            format!("QEMU {}", self.qemu)
        } else {
            format!("QEMU {} -> {}", self.qemu, self.restore_qemu)
        };
        let verdict = if self.passed { "PASS" } else { "FAIL" };
        writeln!(f, "{verdict} roundtrip ({qemus}, {})", self.transport)?;
        for c in &self.checks {
            writeln!(f, "  {:<10} {}", c.check, c.detail)?;
        }
        if let Some(fail) = &self.failure {
            writeln!(f, "  FAILED {}: {}", fail.check, fail.detail)?;
            writeln!(f, "  kept in {}", self.workdir.display())?;
        }
        write!(f, "  total      {:.2} s", self.total_seconds)
    }
}

/// The report as a JUnit XML test suite named `name`: one test case per
/// check that passed, and one for the check that failed.
pub fn junit(report: &Report, name: &str) -> String {
    let mut cases = String::new();
    for c in &report.checks {
        cases.push_str(&format!(
            "    <testcase classname=\"{}\" name=\"{}\"><system-out>{}</system-out></testcase>\n",
            xml(name),
            xml(&c.check),
            xml(&c.detail)
        ));
    }
    if let Some(f) = &report.failure {
        cases.push_str(&format!(
            "    <testcase classname=\"{}\" name=\"{}\"><failure type=\"{}\" message=\"{}\"/>\
             <system-out>{}</system-out></testcase>\n",
            xml(name),
            xml(&f.check),
            xml(&serde_json::to_value(f.kind).map_or(String::new(), |v| {
                v.as_str().unwrap_or_default().to_string()
            })),
            xml(&f.detail),
            xml(&format!("kept in {}", report.workdir.display()))
        ));
    }
    let tests = report.checks.len() + usize::from(report.failure.is_some());
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <testsuites>\n  <testsuite name=\"{}\" tests=\"{tests}\" failures=\"{}\" errors=\"0\" \
         time=\"{:.3}\">\n{cases}  </testsuite>\n</testsuites>\n",
        xml(name),
        usize::from(report.failure.is_some()),
        report.total_seconds
    )
}

fn xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // XML 1.0 has no other control characters, even escaped.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_xml_cannot_hold() {
        assert_eq!(
            xml("a<b & \"c\"\u{7}"),
            "a&lt;b &amp; &quot;c&quot;\u{FFFD}"
        );
    }
}
