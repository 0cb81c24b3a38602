"""What runs read and write: benchmark and prompt files (:mod:`.benchmarks`), rollout stores of
trajectories (:mod:`.store`), and the sources of training batches (:mod:`.sources`: prompts to sample
from, rollout stores, SFT texts)."""
