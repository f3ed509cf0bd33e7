// `ablate report SWEEP --out report.html`: a self-contained HTML report of a sweep (no script, no external
// resource): the cells, one table per factor (runs per value, mean/best final eval loss, ...), and the train/eval
// loss curves of every run as inline SVG, also grouped by each factor.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "ablate/v1/ablate.pb.h"
#include "cli/commands.h"

namespace ablate::cli {

struct ReportCurve {
  std::vector<int64_t> steps;
  std::vector<double> values;
};

struct ReportData {
  v1::Sweep sweep;
  v1::CompareSweepResponse compare;                          // factor_names and one row per cell
  std::vector<v1::Job> jobs;
  std::map<int64_t, std::map<std::string, ReportCurve>> curves;  // job id -> metric name -> curve
  std::string generated_at;                                  // shown in the footer
};

// The HTML text (pure; unit-testable).
std::string RenderReportHtml(const ReportData& data);

// The color of the i-th run's curves (distinct for the first 12, then spread over the hue circle).
std::string RunColor(size_t i);

// Fetches GetSweep, ListJobs, CompareSweep and GetJobMetrics per job, writes `out`. Exit code like the others.
int CmdReport(const Conn& c, int64_t sweep_id, const std::string& out);

}  // namespace ablate::cli
