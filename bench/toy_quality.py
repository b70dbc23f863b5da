"""The Quick start's promise, rerun: the toy preset trained with several seeds, and the exact metrics each run
prints at its end (2,000 samples, EMA 0.100) gathered into one table with their range over the seeds.

    python bench/toy_quality.py --seeds=0,1,2 --outdir=training-runs/toy-seeds     # ~6 minutes per seed on 2 cores

Runs that already finished in --outdir are read, not retrained. The README's Quick start figures come from here.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import click

from dnnlib.util import parse_int_list, run_cli
METRICS = ('class_accuracy', 'tv', 'spread')

def final_metrics(run_dir, ema='0.100'):
    """{steps: {metric: value}} from the last stats.jsonl record of a finished toy run."""
    with open(os.path.join(run_dir, 'stats.jsonl')) as f:
        record = json.loads(f.readlines()[-1])
    return {steps: {m: record[f'Final-{ema}/{steps}-step/{m}']['mean'] for m in METRICS} for steps in (1, 2, 4)}

@click.command()
@click.option('--seeds', default='0,1,2', show_default=True, help='Seeds, e.g. 0,1,2 or 0-4')
@click.option('--outdir', default='training-runs/toy-seeds', show_default=True, metavar='DIR')
def main(seeds, outdir):
    results = {}
    for seed in run_cli(parse_int_list, seeds):
        run_dir = os.path.join(outdir, f'seed{seed}')
        subprocess.run([sys.executable, os.path.join(ROOT, 'train_ncvsd.py'), '--preset=toy', f'--outdir={run_dir}', f'--seed={seed}'],
            check=True, cwd=ROOT)
        results[seed] = final_metrics(run_dir)
    print('| steps | ' + ' | '.join(f'seed {s}: acc / TV / spread' for s in results) + ' | range of TV | range of spread |')
    print('| --- ' * (len(results) + 3) + '|')
    for steps in (1, 2, 4):
        rows = [results[s][steps] for s in results]
        cells = ' | '.join(f'{r["class_accuracy"]:.3f} / {r["tv"]:.3f} / {r["spread"]:.3f}' for r in rows)
        tvs, spreads = [r['tv'] for r in rows], [r['spread'] for r in rows]
        print(f'| {steps} | {cells} | {min(tvs):.3f}-{max(tvs):.3f} | {min(spreads):.3f}-{max(spreads):.3f} |')

if __name__ == '__main__':
    main()
