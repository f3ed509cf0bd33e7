// Checkpoint validity as the worker sees it (docs/contracts.md): a checkpoint directory is valid only when its
// manifest.json (written last) exists and every file it lists has the listed size and SHA-256. The worker reports
// only valid checkpoints to the scheduler and resumes only from one that verifies (falling back to an older one).
#pragma once
#include <string>

namespace ablate::worker {

bool VerifyCheckpoint(const std::string& dir, std::string* error);
std::string Sha256File(const std::string& path, bool* ok);

}  // namespace ablate::worker
