// Text output of the ablate CLI: aligned tables, CSV, JSON, human units. Pure functions (unit-tested).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ablate/v1/ablate.pb.h"

namespace ablate::cli {

// Columns padded to their widest cell; a column whose header is in right_align is right-aligned (numbers).
std::string FormatTable(const std::vector<std::string>& headers, const std::vector<std::vector<std::string>>& rows,
                        const std::vector<bool>& right_align = {});
// RFC 4180: fields with a comma, quote or newline are quoted, quotes doubled.
std::string FormatCsv(const std::vector<std::string>& headers, const std::vector<std::vector<std::string>>& rows);

std::string HumanBytes(double bytes);        // 1536 -> "1.5 KiB"; NaN/negative -> "-"
std::string HumanCount(double n);           // 51234 -> "51.2k"
std::string FormatNumber(double v, int precision = 4);  // NaN -> "-"
std::string ProgressBar(int64_t done, int64_t total, int width = 20);  // "[#####.....]"

std::string JobStateName(v1::JobState s);      // "running"
std::string SweepStateName(v1::SweepState s);  // "succeeded"
std::string FailureClassName(v1::FailureClass c);  // "oom"; "" when unspecified
bool IsTerminal(v1::SweepState s);

enum class CompareFormat { kTable, kCsv, kJson };
// One row per cell: JOB, one column per varying factor, STATE, STEPS, TRAIN LOSS, EVAL LOSS, PPL, TOK/S, PEAK MEM.
// Table uses human units; CSV and JSON keep raw numbers (JSON: null where not reported).
std::string FormatCompare(const v1::CompareSweepResponse& resp, CompareFormat format);

// Per-job table of `ablate status SWEEP`.
std::string FormatJobs(const std::vector<v1::Job>& jobs, bool progress_bars);
// Sweep list of `ablate status` / `ablate list`.
std::string FormatSweeps(const std::vector<v1::Sweep>& sweeps);
// "sweep 3 demo: running  4 jobs: 1 queued, 2 running, 1 succeeded"
std::string SweepSummary(const v1::Sweep& sweep);
// The cells of a submitted sweep: JOB, then each factor (sorted by name).
std::string FormatCells(const std::vector<v1::Job>& jobs);

}  // namespace ablate::cli
