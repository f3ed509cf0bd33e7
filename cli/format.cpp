#include "cli/format.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

namespace ablate::cli {

namespace {

size_t DisplayWidth(const std::string& s) {
  // UTF-8: count code points, not bytes (progress bars and factor values may hold non-ASCII).
  size_t n = 0;
  for (unsigned char c : s)
    if ((c & 0xC0) != 0x80) ++n;
  return n;
}

std::string Metric(const v1::Job& j, const char* name, int precision = 4) {
  auto it = j.latest_metrics().find(name);
  if (it == j.latest_metrics().end()) return "-";
  return FormatNumber(it->second, precision);
}

}  // namespace

std::string FormatTable(const std::vector<std::string>& headers, const std::vector<std::vector<std::string>>& rows,
                        const std::vector<bool>& right_align) {
  std::vector<size_t> width(headers.size());
  for (size_t c = 0; c < headers.size(); ++c) width[c] = DisplayWidth(headers[c]);
  for (const auto& r : rows)
    for (size_t c = 0; c < r.size() && c < width.size(); ++c) width[c] = std::max(width[c], DisplayWidth(r[c]));
  std::ostringstream os;
  auto line = [&](const std::vector<std::string>& cells) {
    std::string out;
    for (size_t c = 0; c < headers.size(); ++c) {
      std::string v = c < cells.size() ? cells[c] : "";
      std::string pad(width[c] - std::min(width[c], DisplayWidth(v)), ' ');
      bool right = c < right_align.size() && right_align[c];
      if (c > 0) out += "  ";
      out += right ? pad + v : (c + 1 == headers.size() ? v : v + pad);
    }
    os << out << "\n";
  };
  line(headers);
  for (const auto& r : rows) line(r);
  return os.str();
}

std::string FormatCsv(const std::vector<std::string>& headers, const std::vector<std::vector<std::string>>& rows) {
  std::ostringstream os;
  auto field = [](const std::string& v) {
    if (v.find_first_of(",\"\n\r") == std::string::npos) return v;
    std::string q = "\"";
    for (char c : v) q += c == '"' ? std::string("\"\"") : std::string(1, c);
    return q + "\"";
  };
  auto line = [&](const std::vector<std::string>& cells) {
    for (size_t i = 0; i < cells.size(); ++i) os << (i ? "," : "") << field(cells[i]);
    os << "\n";
  };
  line(headers);
  for (const auto& r : rows) line(r);
  return os.str();
}

std::string HumanBytes(double b) {
  if (!std::isfinite(b) || b < 0) return "-";
  static const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  int u = 0;
  while (b >= 1024 && u < 5) b /= 1024, ++u;
  char buf[32];
  if (u == 0) std::snprintf(buf, sizeof buf, "%.0f B", b);
  else std::snprintf(buf, sizeof buf, "%.1f %s", b, units[u]);
  return buf;
}

std::string HumanCount(double n) {
  if (!std::isfinite(n)) return "-";
  char buf[32];
  double a = std::fabs(n);
  if (a >= 1e9) std::snprintf(buf, sizeof buf, "%.1fG", n / 1e9);
  else if (a >= 1e6) std::snprintf(buf, sizeof buf, "%.1fM", n / 1e6);
  else if (a >= 1e3) std::snprintf(buf, sizeof buf, "%.1fk", n / 1e3);
  else std::snprintf(buf, sizeof buf, "%.0f", n);
  return buf;
}

std::string FormatNumber(double v, int precision) {
  if (!std::isfinite(v)) return std::isnan(v) ? "-" : (v > 0 ? "inf" : "-inf");
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*g", precision, v);
  return buf;
}

std::string ProgressBar(int64_t done, int64_t total, int width) {
  if (total <= 0) return "[" + std::string(width, '.') + "]";
  double f = std::clamp(static_cast<double>(done) / static_cast<double>(total), 0.0, 1.0);
  int filled = static_cast<int>(std::lround(f * width));
  return "[" + std::string(filled, '#') + std::string(width - filled, '.') + "]";
}

std::string JobStateName(v1::JobState s) {
  switch (s) {
    case v1::JOB_STATE_QUEUED: return "queued";
    case v1::JOB_STATE_LEASED: return "leased";
    case v1::JOB_STATE_RUNNING: return "running";
    case v1::JOB_STATE_SUCCEEDED: return "succeeded";
    case v1::JOB_STATE_FAILED: return "failed";
    case v1::JOB_STATE_CANCELLED: return "cancelled";
    default: return "unknown";
  }
}

std::string SweepStateName(v1::SweepState s) {
  switch (s) {
    case v1::SWEEP_STATE_ACTIVE: return "active";
    case v1::SWEEP_STATE_SUCCEEDED: return "succeeded";
    case v1::SWEEP_STATE_FAILED: return "failed";
    case v1::SWEEP_STATE_CANCELLED: return "cancelled";
    default: return "unknown";
  }
}

std::string FailureClassName(v1::FailureClass c) {
  switch (c) {
    case v1::FAILURE_CLASS_OOM: return "oom";
    case v1::FAILURE_CLASS_DIVERGED: return "diverged";
    case v1::FAILURE_CLASS_CRASH: return "crash";
    case v1::FAILURE_CLASS_HANG: return "hang";
    case v1::FAILURE_CLASS_INFRA: return "infra";
    case v1::FAILURE_CLASS_INVALID_CONFIG: return "invalid_config";
    case v1::FAILURE_CLASS_UNSCHEDULABLE: return "unschedulable";
    default: return "";
  }
}

bool IsTerminal(v1::SweepState s) {
  return s == v1::SWEEP_STATE_SUCCEEDED || s == v1::SWEEP_STATE_FAILED || s == v1::SWEEP_STATE_CANCELLED;
}

std::string FormatCompare(const v1::CompareSweepResponse& resp, CompareFormat format) {
  std::vector<std::string> factors(resp.factor_names().begin(), resp.factor_names().end());
  std::vector<std::string> headers = {"JOB"};
  for (const auto& f : factors) headers.push_back(f);
  const std::vector<std::string> metric_headers = {"STATE", "STEPS", "TRAIN LOSS", "EVAL LOSS", "PPL", "TOK/S",
                                                   "PEAK MEM"};
  if (format == CompareFormat::kJson) {
    nlohmann::json out = nlohmann::json::array();
    auto num = [](double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); };
    for (const auto& r : resp.rows()) {
      nlohmann::json f = nlohmann::json::object();
      for (const auto& [k, v] : r.factors()) f[k] = v;
      out.push_back({{"job_id", r.job_id()},
                     {"factors", f},
                     {"state", JobStateName(r.state())},
                     {"steps", r.steps()},
                     {"final_train_loss", num(r.final_train_loss())},
                     {"final_eval_loss", num(r.final_eval_loss())},
                     {"eval_perplexity", num(r.eval_perplexity())},
                     {"tokens_per_sec", num(r.tokens_per_sec())},
                     {"peak_memory_bytes", num(r.peak_memory_bytes())}});
    }
    return nlohmann::json({{"factor_names", factors}, {"rows", out}}).dump(2) + "\n";
  }
  std::vector<std::vector<std::string>> rows;
  const bool csv = format == CompareFormat::kCsv;
  auto raw = [](double v) { return std::isfinite(v) ? FormatNumber(v, 10) : std::string(); };
  for (const auto& r : resp.rows()) {
    std::vector<std::string> row = {std::to_string(r.job_id())};
    for (const auto& f : factors) {
      auto it = r.factors().find(f);
      row.push_back(it == r.factors().end() ? "" : it->second);
    }
    row.push_back(JobStateName(r.state()));
    row.push_back(std::to_string(r.steps()));
    if (csv) {
      for (double v : {r.final_train_loss(), r.final_eval_loss(), r.eval_perplexity(), r.tokens_per_sec(),
                       r.peak_memory_bytes()})
        row.push_back(raw(v));
    } else {
      row.push_back(FormatNumber(r.final_train_loss()));
      row.push_back(FormatNumber(r.final_eval_loss()));
      row.push_back(FormatNumber(r.eval_perplexity()));
      row.push_back(HumanCount(r.tokens_per_sec()));
      row.push_back(HumanBytes(r.peak_memory_bytes()));
    }
    rows.push_back(std::move(row));
  }
  if (csv) {
    std::vector<std::string> h = {"job_id"};
    for (const auto& f : factors) h.push_back(f);
    for (const char* m : {"state", "steps", "final_train_loss", "final_eval_loss", "eval_perplexity", "tokens_per_sec",
                          "peak_memory_bytes"})
      h.push_back(m);
    return FormatCsv(h, rows);
  }
  headers.insert(headers.end(), metric_headers.begin(), metric_headers.end());
  std::vector<bool> right(headers.size(), false);
  right[0] = true;
  for (size_t c = 1 + factors.size() + 1; c < headers.size(); ++c) right[c] = true;  // the numbers
  return FormatTable(headers, rows, right);
}

std::string FormatJobs(const std::vector<v1::Job>& jobs, bool progress_bars) {
  // Factor columns: the union of factor names, sorted (the jobs of a sweep share them).
  std::set<std::string> names;
  for (const auto& j : jobs)
    for (const auto& [k, v] : j.factors()) names.insert(k);
  std::vector<std::string> headers = {"JOB"};
  headers.insert(headers.end(), names.begin(), names.end());
  for (const char* h : {"STATE", "ATT", "STEP", "TRAIN LOSS", "EVAL LOSS", "TOK/S"}) headers.push_back(h);
  if (progress_bars) headers.push_back("PROGRESS");
  std::vector<std::vector<std::string>> rows;
  for (const auto& j : jobs) {
    std::vector<std::string> row = {std::to_string(j.id())};
    for (const auto& n : names) {
      auto it = j.factors().find(n);
      row.push_back(it == j.factors().end() ? "" : it->second);
    }
    std::string state = JobStateName(j.state());
    if (j.state() == v1::JOB_STATE_FAILED && j.failure_class() != v1::FAILURE_CLASS_UNSPECIFIED)
      state += "(" + FailureClassName(j.failure_class()) + ")";
    row.push_back(state);
    row.push_back(std::to_string(j.attempt()));
    std::string step = j.latest_step() >= 0 ? std::to_string(j.latest_step()) : "-";
    row.push_back(step + "/" + (j.total_steps() > 0 ? std::to_string(j.total_steps()) : "?"));
    row.push_back(Metric(j, "train/loss"));
    row.push_back(Metric(j, "eval/loss"));
    auto tps = j.latest_metrics().find("train/tokens_per_sec");
    row.push_back(tps == j.latest_metrics().end() ? "-" : HumanCount(tps->second));
    if (progress_bars) {
      int64_t done = j.state() == v1::JOB_STATE_SUCCEEDED ? j.total_steps() : std::max<int64_t>(0, j.latest_step());
      row.push_back(ProgressBar(done, j.total_steps()));
    }
    rows.push_back(std::move(row));
  }
  std::vector<bool> right(headers.size(), false);
  right[0] = true;
  size_t first_num = 1 + names.size() + 1;
  for (size_t c = first_num; c < first_num + 5; ++c) right[c] = true;
  return FormatTable(headers, rows, right);
}

std::string SweepSummary(const v1::Sweep& s) {
  std::ostringstream os;
  os << "sweep " << s.id() << " " << s.name() << ": " << SweepStateName(s.state()) << "  " << s.total_jobs()
     << " jobs";
  // Fixed order, so the line reads the same every redraw.
  static const char* order[] = {"queued", "leased", "running", "succeeded", "failed", "cancelled"};
  std::string parts;
  std::set<std::string> seen;
  for (const char* st : order) {
    auto it = s.job_counts().find(st);
    seen.insert(st);
    if (it != s.job_counts().end() && it->second > 0)
      parts += (parts.empty() ? "" : ", ") + std::to_string(it->second) + " " + st;
  }
  for (const auto& [k, v] : s.job_counts())
    if (!seen.count(k) && v > 0) parts += (parts.empty() ? "" : ", ") + std::to_string(v) + " " + k;
  if (!parts.empty()) os << ": " << parts;
  return os.str();
}

std::string FormatSweeps(const std::vector<v1::Sweep>& sweeps) {
  std::vector<std::vector<std::string>> rows;
  auto count = [](const v1::Sweep& s, const char* k) {
    auto it = s.job_counts().find(k);
    return std::to_string(it == s.job_counts().end() ? 0 : it->second);
  };
  for (const auto& s : sweeps) {
    int active = 0;
    for (const char* k : {"leased", "running"}) {
      auto it = s.job_counts().find(k);
      if (it != s.job_counts().end()) active += it->second;
    }
    rows.push_back({std::to_string(s.id()), s.name(), SweepStateName(s.state()), std::to_string(s.total_jobs()),
                    count(s, "queued"), std::to_string(active), count(s, "succeeded"), count(s, "failed"),
                    count(s, "cancelled")});
  }
  return FormatTable({"ID", "NAME", "STATE", "JOBS", "QUEUED", "RUNNING", "OK", "FAILED", "CANCELLED"}, rows,
                     {true, false, false, true, true, true, true, true, true});
}

std::string FormatCells(const std::vector<v1::Job>& jobs) {
  std::set<std::string> names;
  for (const auto& j : jobs)
    for (const auto& [k, v] : j.factors()) names.insert(k);
  std::vector<std::string> headers = {"JOB", "CELL"};
  headers.insert(headers.end(), names.begin(), names.end());
  std::vector<std::vector<std::string>> rows;
  for (const auto& j : jobs) {
    std::vector<std::string> row = {j.id() > 0 ? std::to_string(j.id()) : "-", std::to_string(j.cell_index())};
    for (const auto& n : names) {
      auto it = j.factors().find(n);
      row.push_back(it == j.factors().end() ? "" : it->second);
    }
    rows.push_back(std::move(row));
  }
  return FormatTable(headers, rows, {true, true});
}

}  // namespace ablate::cli
