"""User-facing evaluation: evaluation/calibration data, FP/W8A8 perplexity, outlier reports, the outlier experiment.

    eval_data   eval_blocks, calibration_batches, load_token_stream, EvalData, check_data_source, tokenizer_for
    quant_eval  evaluate_quantization, fp16_perplexity, simulated_w8a8_perplexity,
                deployable_w8a8_perplexity, load_hf_model, check_model_dir, model_info
    report      ReportSettings, collect_model_stats, build_report, write_report, render_markdown, plot_report
                (ReportSettings lives in report_settings, which does not import torch)
    experiment  load_experiment, run_experiment, judge   (tools/run_experiment.py)
Import the submodules directly (this __init__ stays import-light).
"""
