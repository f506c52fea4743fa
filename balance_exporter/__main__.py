from balance_exporter.cli import main

raise SystemExit(main())
