"""starling_lib: the library behind the Starling-7B (RLAIF) reproduction notebooks.

Modules, in the order the notebooks use them (README.md's layout has a line for each; imports
run from the shared plumbing to the stages, never back):
  runs, data, models, losses, training   shared plumbing: run folders and settings, Nectar,
                models and their layers, pure tensor losses, what every trainer shares
  explore       tables behind notebook 01 (Nectar statistics)
  llm_client, jsonl_cache   the OpenAI-compatible chat client; the JSONL cache of paid judgments
  bias, judge, simulated_judge   GPT-4's positional bias (notebook 02); the 7-wise ranking judge
  rm_layout, reward_model, released_rm, rm_io, rm_eval, rm_train, rm_report   the K-wise reward
                model (notebook 03), and the authors' released ones loaded as their cards do
  chat, sampling, rollout, sft   chat formats; rollouts with a shared-trunk reference; the warm-up SFT
  policy        stage 04 as a package: APA, PPO, P3O online and DPO offline (notebook 04)
  mtbench, alpaca   MT-Bench and AlpacaEval (notebook 05)
  pipeline, sweep   papermill runner for papermill_runs/*.yaml; seed sweeps summarised across seeds
  progress, notebook_format   tqdm bars in papermill runs; the committed form of the notebooks
"""

__version__ = "0.1.0"

from starling_lib import progress as _progress

_progress.configure_from_environment()  # text bars when a runner asks (STARLING_PLAIN_PROGRESS)
