"""``make pipeline``: demonstrations -> RLDS -> fine-tune -> closed-loop evaluation, end to end.

    python -m openvla_ros.pipeline [--base DIR] [--episodes 300] [--eval-episodes 20] [--steps 2000]
                                   [--energy-steps N] [--camera-upside-down] [--quick]

1. record: starts the ``sim_scene`` node (child process, JPEG camera stream, scripted expert at
   ``--expert-rate`` Hz) and records each expert episode into its own rosbag2 bag with
   :class:`~openvla_ros.ros.record.BagRecorder`, over DDS, exactly as ``python -m openvla_ros.ros.record``
   would (topics of ``config/pipeline.yaml``);
2. convert: the bags -> the RLDS dataset ``sim_<task>`` with :func:`~openvla_ros.dataset.convert_bags`;
3. fine-tune: LoRA on the base (the pretrained tiny base when cached, else the random tiny model) with
   :class:`~openvla_ros.finetune.trainer.Trainer` (the machinery of ``training/finetune.py``; an
   OpenVLA-OFT base keeps its L1 head, chunk and proprio), writing ``<out>/merged`` (the model
   ``make demo`` picks up); with ``--energy-steps`` an energy model is trained on it too;
4. evaluate offline: ``training/evaluate.py`` on the val split (JSON + its PNG);
5. evaluate closed loop: the base and the fine-tuned model (and, with ``--energy-steps``, the fine-tuned
   model with energy refinement) on ``--eval-episodes`` fresh
   episodes (seeds never recorded), in process against the same sim, renderer and image path as the
   node (``predict_action`` on the rendered RGB frame); optionally ``--node-episodes`` more through the
   real ``sim_scene`` + ``policy_node`` processes.

Everything goes to ``--out`` (``artifacts/pipeline``): ``bags/``, ``data/``, the fine-tune's outputs,
``trajectories.png``, ``training_curve.png``, ``evaluate_val.png``, ``report.json`` and ``logs/``.
Exit status: 0 when every stage ran (whatever the success rates), 1 when a stage failed.

The stages live in the package's modules: ``settings`` (options and defaults), ``processes`` (the
child nodes and the pipeline's own rclpy session), ``stages`` (record, convert, fine-tune, energy,
offline evaluation), ``closed_loop`` (in process and through the nodes), ``report`` (report.json, the
plots and the table) and ``app`` (the order of the stages, ``main``).
"""

from openvla_ros.pipeline.app import main, run
from openvla_ros.pipeline.processes import wait_for
from openvla_ros.pipeline.report import MARKER, Report, prepare_out_dir, wilson_interval
from openvla_ros.pipeline.settings import PipelineError, PipelineSettings, WaitTimeoutError

__all__ = ["MARKER", "PipelineError", "PipelineSettings", "Report", "WaitTimeoutError", "main", "prepare_out_dir",
           "run", "wait_for", "wilson_interval"]
