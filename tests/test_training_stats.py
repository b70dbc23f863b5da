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
