"""The prediction log and the drift checks on it, side by side: the service writes one JSON line per
prediction (predlog.py, predrecord.py); `covid-cxr monitor` and the monitor flow read them back and
compare a window with the test split (monitor.py, drift.py, driftsamples.py)."""
