from torch_utils import training_stats

def test_collector_reports_only_fresh_statistics():
    collector = training_stats.Collector(regex='Test/.*', keep_previous=False)
    for value in (1.0, 2.0, 3.0):
        training_stats.report('Test/a', value)
    training_stats.report('Test/b', [4.0, 6.0])
    collector.update()
    assert collector.num('Test/a') == 3 and collector.mean('Test/a') == 2.0
    assert abs(collector.std('Test/a') - (2 / 3) ** 0.5) < 1e-12
    assert collector.as_dict()['Test/b']['mean'] == 5.0
    training_stats.report('Test/a', 10.0)
    collector.update()
    assert collector.as_dict() == {'Test/a': dict(num=1, mean=10.0, std=0.0)}

def test_one_nonfinite_value_spoils_its_interval_only():
    """Intervals were differences of totals since the start: after one NaN, every later mean was NaN."""
    collector = training_stats.Collector(regex='Test/.*', keep_previous=False)
    training_stats.report('Test/nan', [float('nan'), 1.0])
    collector.update()
    assert collector.num('Test/nan') == 2 and collector.mean('Test/nan') != collector.mean('Test/nan')
    training_stats.report('Test/nan', [1.0, 3.0])
    collector.update()
    assert collector.mean('Test/nan') == 2.0 and collector.std('Test/nan') == 1.0

def test_collectors_with_their_own_cadence_see_every_value_once():
    every, rarely = training_stats.Collector(regex='Test/.*'), training_stats.Collector(regex='Test/c')
    training_stats.report('Test/c', 1.0)
    every.update()                                  # Syncs Test/c for both collectors.
    training_stats.report('Test/c', 3.0)
    every.update()
    rarely.update()
    assert every.num('Test/c') == 1 and every.mean('Test/c') == 3.0
    assert rarely.num('Test/c') == 2 and rarely.mean('Test/c') == 2.0
