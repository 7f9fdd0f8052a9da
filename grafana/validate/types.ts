// What the dashboard adds to @grafana/schema's types: the Prometheus data source's query fields
// (its own query type, not part of the schema package) and the display options of a Prometheus
// annotation. Everything else must be plain schema.
import type { AnnotationQuery, Dashboard, DataQuery } from '@grafana/schema';

/** A Prometheus query (panel target or annotation target). */
export interface PromQuery extends DataQuery {
  expr: string;
  legendFormat?: string;
  interval?: string;
  range?: boolean;
}

/** A Prometheus annotation: the schema's AnnotationQuery plus how its series become events. */
export interface PromAnnotation extends AnnotationQuery<PromQuery> {
  titleFormat?: string;
  textFormat?: string;
  tagKeys?: string;
  useValueForTime?: boolean;
}

/** The schema's Dashboard whose annotations may be Prometheus annotations. */
export type TaprootDashboard = Omit<Dashboard, 'annotations'> & {
  annotations?: { list?: Array<AnnotationQuery | PromAnnotation> };
};
